"""The spec's Prometheus metrics, exported from the workers' device counters.

The counters live in the engine's worker (router.LayerCounters). The API
server keeps the latest snapshot of them (read through collective_rpc when
/metrics is scraped, see app.py) and this collector turns it into the metric
families of the spec's table, so they appear on /metrics beside vLLM's own.
Labels are bounded: layer, order (1..max_extra), expert, kind; no request
ever reaches a label.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from smoothsmoe_server.engine.snapshot import Snapshot


class RoutingMetrics(Collector):
    """A Prometheus collector over the last worker snapshot (see SmoothWorkerExtension.smoothsmoe_snapshot)."""

    def __init__(self):
        self.snapshot = Snapshot(options=None)

    def update(self, snapshot: Snapshot | dict | None) -> None:
        """Keep `snapshot` (a Snapshot or its wire form; None, a rank that does not report, keeps the last)."""
        if snapshot is not None:
            self.snapshot = Snapshot.from_wire(snapshot)

    def describe(self):
        # Nothing to describe up front: registering must not trigger a collect.
        return []

    def collect(self):
        def counter(name, doc, labels=("layer",)):
            return CounterMetricFamily(name, doc, labels=list(labels))

        tokens = counter("smoothsmoe_tokens_routed", "Tokens that passed the MoE layer (padding and warm-up excluded).")
        active = counter("smoothsmoe_active_experts", "Sum over tokens of active experts (top_k + order).")
        extras = counter("smoothsmoe_extra_experts", "Sum over tokens of active extra experts (order).")
        hits = counter("smoothsmoe_boundary_hits", "Tokens of each order >= 1 (extras in the band).", ("layer", "order"))
        capped = counter("smoothsmoe_capped_tokens", "Tokens whose band was cut by the max_extra cap.")
        load = counter("smoothsmoe_expert_tokens", "Tokens routed to each expert, top-k and extra slots apart.",
                       ("layer", "expert", "kind"))
        margin = HistogramMetricFamily("smoothsmoe_router_margin",
                                       "Router margin z(k) - z(k+1) per token, in score units.", labels=["layer"])
        eps = GaugeMetricFamily("smoothsmoe_epsilon", "The layer's band width eps, in score units.", labels=["layer"])
        bounds = GaugeMetricFamily("smoothsmoe_epsilon_bound",
                                   "With --smooth-eps online: the least and greatest eps the layer's controller may "
                                   "set. eps held at one for long: the budget is out of reach.",
                                   labels=["layer", "bound"])
        smoothed = GaugeMetricFamily("smoothsmoe_layer_smoothed",
                                     "1 if the layer routes smoothed, 0 if it keeps stock top-k.", labels=["layer"])
        experts = GaugeMetricFamily("smoothsmoe_layer_experts",
                                    "The layer's experts computation (value 1): smoothsmoe computes active pairs "
                                    "only, vllm every slot.", labels=["layer", "experts"])
        top_ks = set()
        for s in self.snapshot.layers:
            layer = str(s.layer)
            st = s.counts()
            top_ks.add(s.top_k)
            tokens.add_metric([layer], st.tokens)
            active.add_metric([layer], st.active)
            extras.add_metric([layer], st.extras)
            capped.add_metric([layer], st.capped)
            for order, n in enumerate(st.hits_by_order, start=1):
                hits.add_metric([layer, str(order)], n)
            for e, (n_top, n_extra) in enumerate(zip(st.expert_tokens_topk, st.expert_tokens_extra)):
                load.add_metric([layer, str(e), "topk"], n_top)
                load.add_metric([layer, str(e), "extra"], n_extra)
            cumulative, buckets = 0, []
            for edge, n in zip([*s.margin_edges, float("inf")], st.margin_buckets):
                cumulative += n
                buckets.append(("+Inf" if edge == float("inf") else repr(edge), cumulative))
            margin.add_metric([layer], buckets, st.margin_sum)
            eps.add_metric([layer], s.eps)
            if s.eps_bounds is not None:
                bounds.add_metric([layer, "min"], s.eps_bounds[0])
                bounds.add_metric([layer, "max"], s.eps_bounds[1])
            smoothed.add_metric([layer], 1.0 if s.smoothed else 0.0)
            experts.add_metric([layer, s.experts], 1.0)
        for u in self.snapshot.uncounted:
            smoothed.add_metric([str(u.layer)], 0.0)
        info = GaugeMetricFamily("smoothsmoe_config_info", "Smoothing configuration (value is always 1).",
                                 labels=["top_k", "max_extra", "budget", "smoothing", "model"])
        budget = GaugeMetricFamily("smoothsmoe_extra_budget",
                                   "Target mean extra experts per token (0 with smoothing off); alerts compare to it.")
        o = self.snapshot.options
        if o is not None:
            info.add_metric([",".join(map(str, sorted(top_ks))), str(o.max_extra), str(o.budget),
                             "on" if o.enabled else "off", o.model], 1.0)
            budget.add_metric([], o.budget if o.enabled else 0.0)
        yield from (tokens, active, extras, hits, capped, margin, eps, bounds, load, smoothed, experts, info, budget)
