"""The routers this project puts into vLLM's MoE layers, and the op that runs them.

SmoothRouter routes a layer with smooth_topk at width k + max_extra (smoothing
on); CountingRouter keeps vLLM's own router and only counts (smoothing off, or a
layer its LayerPlan keeps stock). Both are CountedRouters, made from the layer's
plan: each owns its layer's statistics buffer, allocated once on the device and
updated in place, so counting survives torch.compile and needs no host sync.

vLLM's CPU backend traces the router into its compiled graph. A smoothed layer on
the CPU lets it: SmoothRouter.route_traced is plain torch ops (routing_cpu)
with eps and the recorder's flag as tensors, so a new eps or the start of a
calibration is seen without a re-trace; a CountingRouter's counting is traced there too, beside
vLLM's routing (routing_cpu.count_stock_cpu). On CUDA routing and
counting run inside custom ops (`smoothsmoe::route`,
`smoothsmoe::count`): opaque to the compiler, they run eagerly every step. The
ops find their router through vLLM's forward context, by layer name, as vLLM's
own MoE op finds its layer.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from smoothsmoe_kernels import RoutingResult, StatsLayout, accumulate, resolve_backend, resolve_routing_backend
from smoothsmoe_kernels.eps_control import EpsControl, EpsController
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing import route_with_gaps, stock_result
from smoothsmoe_kernels.routing_cpu import count_stock_cpu, smooth_topk_cpu
from smoothsmoe_server.engine.layer_plan import LayerPlan
from smoothsmoe_server.engine.snapshot import LayerSnapshot
from smoothsmoe_server.options import SmoothingOptions

CALIBRATION_CAPACITY = 16384  # tokens of band gaps a layer keeps while calibrating


class LayerCounters:
    """One layer's statistics buffer and calibration recorder, on the device."""

    def __init__(self, layout: StatsLayout, device: torch.device):
        self.layout = layout
        self.stats = layout.new_buffer(device)  # [layout.size] float64, counts
        layout.edges_on(device)  # the kernel's margin edges, made now: a copy from the host cannot be captured
        self.recorder = GapRecorder(layout.max_extra, CALIBRATION_CAPACITY, device)

    def count(self, result: RoutingResult, valid: torch.Tensor | None) -> None:
        accumulate(self.stats, self.layout, result, valid)

    def reset(self) -> None:
        self.stats.zero_()


class CountedRouter(BaseRouter):
    """What both routers share: the layer's plan, its counters and eps, and its snapshot.

    plan: the layer's LayerPlan (its config, name, index and experts are read from it);
    width: the ids per token the router returns; eps: the band width to start with, in score
    units (0 for a stock layer); correction_bias [E] or None, the model's parameter (loaded in
    place later).
    """

    def __init__(self, plan: LayerPlan, width: int, eps: float, correction_bias: torch.Tensor | None,
                 device: torch.device, options: SmoothingOptions, eplb_state=None):
        if plan.config is None:
            raise ValueError(f"{plan.prefix}: no routing family to count by ({plan.reason})")
        super().__init__(top_k=width, global_num_experts=plan.num_experts, eplb_state=eplb_state)
        plan.config.check_num_experts(plan.num_experts)
        self.plan = plan
        self.config = plan.config
        self.options = options  # what the server was started with, for the metrics
        self.layer_name = plan.prefix
        self.layer_index = plan.layer_index
        self.experts = plan.experts  # which experts computation the layer has: fixed by the plan
        self.correction_bias = correction_bias
        self.eps = torch.tensor(eps, dtype=torch.float32, device=device)  # data: set in place, never re-traced
        self.counters = LayerCounters(StatsLayout(plan.config.top_k, plan.config.max_extra, plan.num_experts), device)
        self.controller: EpsController | None = None

    def snapshot(self) -> LayerSnapshot:
        """The layer's settings and counts as of now (one device-to-host copy of the stats buffer)."""
        c = self.controller
        return LayerSnapshot(
            layer=self.layer_index, smoothed=self.plan.smoothed, experts=self.experts, top_k=self.config.top_k,
            max_extra=self.config.max_extra, num_experts=self.counters.layout.num_experts, eps=float(self.eps),
            eps_bounds=None if c is None else (float(c.lo), float(c.hi)),
            margin_edges=tuple(self.counters.layout.margin_edges), stats=tuple(self.counters.stats.tolist()),
            reason=self.plan.reason)


class SmoothRouter(CountedRouter):
    """Smoothed top-k for one layer: ids and weights at width k + max_extra.

    Slots that smooth_topk leaves inactive (id -1) are handed to vLLM's experts
    kernels as the token's top-1 expert with weight 0: vLLM's kernels read -1
    out of bounds. Those slots are computed and contribute exactly 0. This
    project's experts (plan.experts "smoothsmoe") get the -1 and skip them.
    backend: the routing's, "auto" (the Triton kernel on CUDA, routing_cpu's
    traced path elsewhere), "triton", "cpu" or "torch" (the reference, in the op).
    """

    def __init__(self, plan: LayerPlan, eps: float, correction_bias: torch.Tensor | None, device: torch.device,
                 options: SmoothingOptions, backend: str = "auto"):
        if not plan.smoothed:
            raise ValueError(f"{plan.prefix} is planned stock ({plan.reason}): a CountingRouter counts it")
        super().__init__(plan, plan.config.width, eps, correction_bias, device, options)
        self.backend = backend
        self.traced = _traced(backend, device)  # route_traced, in vLLM's compiled graph
        # --smooth-eps online: moves self.eps to hold the budget (armed after calibration)
        self.controller = EpsController(
            EpsControl(options.budget, options.eps_window, eps_range=options.eps_range), self.eps,
            self.counters.stats) if options.online else None

    @property
    def routing_method_type(self) -> RoutingMethodType:
        # Custom: keeps monolithic kernels (which route by themselves) away.
        return RoutingMethodType.Custom

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        if self.traced:
            return self.route_traced(router_logits)
        return torch.ops.smoothsmoe.route(router_logits, self.layer_name, self.config.width)

    def route_traced(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route and count one step on the CPU, as plain torch ops that torch.compile traces.

        vLLM's CPU build compiles the model's forward; the smoothsmoe::route op is opaque to it and
        ran eagerly beside the compiled graph, about a hundred small ops a layer and step (measured:
        2.1 ms of a 3.1 ms decode step on the default model, stock 3.0 ms a token, smoothed 6.2).
        smooth_topk_cpu has no data-dependent Python (tests/kernels/test_routing_cpu.py compiles it
        whole), so inductor fuses it into the graph: 3.0 to 3.6 ms a token. Its counts and the band
        gaps go to the same buffers in place (eps and the recorder's flag are tensors: setting them
        needs no re-trace). vLLM pads no rows on the CPU, so every row is counted.
        """
        result, _ = smooth_topk_cpu(router_logits, self.config, self.eps, self.correction_bias,
                                    stats=self.counters.stats, recorder=self.counters.recorder)
        if self.controller is not None:
            self.controller.step()
        return self._for_experts(result)

    def route_now(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route and count one step (inside the smoothsmoe::route op).

        On CUDA one Triton launch routes, counts and (while calibrating)
        records the band gaps; elsewhere the torch reference routes and the
        counts and gaps are added after it. Either way no
        host sync and fixed shapes on CUDA (tests/server/test_graph_safety.py).
        """
        valid = _real_rows(router_logits.shape[0], router_logits.device)
        if resolve_backend(self.backend, router_logits.device) == "triton":
            from smoothsmoe_kernels.routing_triton import smooth_topk_triton

            result, _ = smooth_topk_triton(router_logits, self.config, self.eps, self.correction_bias,
                                           stats=self.counters.stats, valid=valid, recorder=self.counters.recorder)
        else:
            result, gaps = route_with_gaps(router_logits, self.config, self.eps, self.correction_bias)
            self.counters.count(result, valid)
            self.counters.recorder.record(gaps, valid)
        if self.controller is not None:
            self.controller.step()
        return self._for_experts(result)

    def route_uncounted(self, router_logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Route at a given eps without counting (the continuity probe)."""
        result, _ = route_with_gaps(router_logits, self.config, eps, self.correction_bias)
        return self._for_experts(result)

    def _for_experts(self, result: RoutingResult) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids) in the form the layer's experts take.

        This project's experts skip id -1, so they get the routing as it is.
        vLLM's read an id of -1 out of bounds: they get inactive slots as the token's top-1 expert at
        weight 0. Nothing between the router and the experts reads the ids: vLLM's runner passes them
        on (it would map them for EPLB, which a smoothed layer's router is not given).
        """
        if self.experts == "smoothsmoe":
            return result.weights, result.ids
        return result.weights, torch.where(result.ids >= 0, result.ids, result.ids[:, :1])


class CountingRouter(CountedRouter):
    """vLLM's own router for a layer, untouched, plus the layer's counters.

    Used with smoothing off, and for layers this project cannot smooth: the
    routing is vLLM's (same ops, same compiled graph), so outputs stay
    identical to stock vLLM; only counting is added beside it, with no host
    sync and fixed shapes (tests/server/test_graph_safety.py).
    """

    def __init__(self, inner: BaseRouter, plan: LayerPlan, correction_bias: torch.Tensor | None,
                 device: torch.device, options: SmoothingOptions):
        if plan.smoothed:
            raise ValueError(f"{plan.prefix} is planned smoothed: a SmoothRouter routes it")
        super().__init__(plan, inner.top_k, 0.0, correction_bias, device, options, eplb_state=inner.eplb_state)
        self.inner = inner
        # On the CPU the counting is traced into vLLM's graph beside vLLM's own routing
        # (count_stock_cpu); eagerly, in the op, it cost more than the routing it counts.
        self.traced = _traced("auto", device)

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return self.inner.routing_method_type

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = self.inner._compute_routing(hidden_states, router_logits, indices_type, input_ids=input_ids)
        if self.traced:  # vLLM pads no rows on the CPU: every row is counted
            count_stock_cpu(router_logits, ids, self.config, self.counters.stats, self.correction_bias)
            return weights, ids
        return weights, torch.ops.smoothsmoe.count(router_logits, ids, self.layer_name)

    def count_now(self, router_logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Count one step of stock routing: router_logits [T, E], ids [T, k] (vLLM's choice).

        The margin comes from the scores' top-k values (routing.router_margin), which ties do
        not change, so it is the margin of whichever tie-break vLLM's router made.
        """
        stock = stock_result(router_logits, ids, self.config, self.correction_bias)
        self.counters.count(stock, _real_rows(ids.shape[0], ids.device))


def _real_rows(T: int, device: torch.device) -> torch.Tensor | None:
    """[T] bool, False on padding rows (CUDA graph padding), or None if all are real."""
    if not is_forward_context_available():
        return None
    is_padding = get_forward_context().is_padding
    return None if is_padding is None else ~is_padding[:T].to(device)


def _traced(backend: str, device: torch.device) -> bool:
    """Whether a router's step is plain torch ops traced into vLLM's compiled graph (routing_cpu), not an op:
    off CUDA, on any number of ranks (each rank counts into its own buffer; /metrics reads rank 0's).

    With tensor parallelism this once looked like it lost the counts; it was /metrics answering from a
    read up to 0.25 s old (middleware.MetricsRefresh no longer caches by age), read right after
    requests the traced path made fast enough to finish within it.
    """
    return resolve_routing_backend(backend, device) == "cpu"


def _router(layer_name: str):
    return get_forward_context().no_compile_layers[layer_name].router


# The ops update their router's counters in place without declaring it
# (mutates_args=()), as vLLM's moe_forward op does with its layer: a declared
# mutation is functionalized by torch.compile, i.e. the op gets a copy and the
# copy is written back over the buffer, which would erase what the op counted
# through the router. Each op's output is used, so the compiler keeps the call.
@torch.library.custom_op("smoothsmoe::route", mutates_args=())
def _route_op(router_logits: torch.Tensor, layer_name: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _router(layer_name).route_now(router_logits)


@_route_op.register_fake
def _(router_logits, layer_name, width):
    T = router_logits.shape[0]
    return router_logits.new_empty(T, width, dtype=torch.float32), router_logits.new_empty(T, width, dtype=torch.int32)


@torch.library.custom_op("smoothsmoe::count", mutates_args=())
def _count_op(router_logits: torch.Tensor, ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    """Counts the stock routing `ids`; returns a copy of them, used in their place."""
    _router(layer_name).count_now(router_logits, ids)
    return ids.clone()


@_count_op.register_fake
def _(router_logits, ids, layer_name):
    return torch.empty_like(ids)
