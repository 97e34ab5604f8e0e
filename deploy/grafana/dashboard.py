"""Builds dashboards/smoothsmoe.json, the Grafana dashboard: python deploy/grafana/dashboard.py

The dashboard is code so that its panels, their queries and their layout stay
reviewable; the JSON beside it is the generated file Grafana provisions (a
test checks that the two agree). PANELS is also what the Prometheus test
evaluates and what the preview image draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "smoothsmoe.json"
M = 'model=~"$model"'
ML = 'model=~"$model", layer=~"$layer"'
VM = 'model_name=~"$model"'
JOIN = '* on (instance, job) group_left (model) smoothsmoe:model_info{model=~"$model"}'


@dataclass
class Panel:
    title: str
    description: str  # how to read it
    targets: list[tuple[str, str]]  # (PromQL, legend)
    x: int
    y: int
    w: int = 8
    h: int = 8
    kind: str = "timeseries"
    unit: str = "short"
    extra: dict = field(default_factory=dict)


def quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{VM}}}[5m])))", f"p{round(q * 100)}")
            for q in (0.5, 0.9, 0.99)]


ROWS = [("Expert overhead", 0), ("Routing boundaries", 17), ("Expert load", 34), ("Serving (vLLM)", 43)]
PANELS = [
    Panel("Mean active experts per token",
          "All layers together: active experts / tokens over 5 minutes. Lies between top_k (stock routing) and "
          "top_k + max_extra; calibrated smoothing puts it at top_k + budget.",
          [(f"smoothsmoe:active_experts_per_token:ratio5m_model{{{M}}}", "{{model}}, all replicas"),
           (f"smoothsmoe:active_experts_per_token:ratio5m_all{{{M}}}", "{{instance}}")], 0, 1),
    Panel("Extra experts per token against the budget",
          "Mean extra experts per token (all layers) and the budget they were calibrated to. Above the budget "
          "for long: the traffic's router margins moved, recalibrate.",
          [(f"smoothsmoe:extra_experts_per_token:ratio5m_model{{{M}}}", "extras {{model}}, all replicas"),
           (f"smoothsmoe:extra_experts_per_token:ratio5m_all{{{M}}}", "extras {{instance}}"),
           (f"smoothsmoe_extra_budget {JOIN}", "budget {{instance}}")], 8, 1),
    Panel("Extra-expert overhead",
          "Extra expert computations over the stock top-k ones: extras / (top_k x tokens), over all replicas "
          "of the model. The cost of smoothing in expert FLOPs (0.5 extras at k = 8 is 6.25 %). Per replica "
          "and layer: the overhead-by-layer panel.",
          [(f"smoothsmoe:extra_overhead:ratio5m_model{{{M}}}", "{{model}}")], 16, 1, kind="stat",
          unit="percentunit"),
    Panel("Mean active experts per token, by layer",
          "The same ratio per MoE layer: layers with many near-ties at the k-th score route more extras "
          "at the same eps; calibration sets eps per layer to even them out.",
          [(f"smoothsmoe:active_experts_per_token:ratio5m{{{ML}}}", "layer {{layer}} {{instance}}")], 0, 9, w=12),
    Panel("Extra-expert overhead, by layer",
          "extras / (top_k x tokens) per layer.",
          [(f"smoothsmoe:extra_overhead:ratio5m{{{ML}}}", "layer {{layer}} {{instance}}")], 12, 9, w=12,
          unit="percentunit"),
    Panel("Boundary-hit rate by order",
          "Share of tokens with 1, 2, ... extras in the band (averaged over the selected layers). Order 1 "
          "dominates when eps is small: most near-boundary inputs sit near one boundary.",
          [(f"avg by (order) (smoothsmoe:boundary_hit_rate:ratio5m{{{ML}}})", "order {{order}}")], 0, 18,
          unit="percentunit"),
    Panel("Capped-token rate",
          "Share of tokens whose band held more than max_extra experts, so the cap moved the band's lower "
          "edge. High: eps is wide for the cap; raise --smooth-max-extra or lower the budget.",
          [(f"smoothsmoe:capped_rate:ratio5m_all{{{M}}}", "all layers"),
           (f"smoothsmoe:capped_rate:ratio5m{{{ML}}}", "layer {{layer}}")], 8, 18, unit="percentunit"),
    Panel("eps per layer",
          "The band width of each layer, in router-score units (logits for softmax routers), as calibrated "
          "at start-up or set by --smooth-eps. With --smooth-eps online it moves with the traffic, between "
          "the dashed bounds; eps resting on a bound means the budget is out of reach for that layer.",
          [(f'smoothsmoe_epsilon{{layer=~"$layer"}} {JOIN}', "layer {{layer}}"),
           (f'smoothsmoe_epsilon_bound{{layer=~"$layer"}} {JOIN}', "layer {{layer}} {{bound}}")], 16, 18),
    Panel("Boundary mass P(margin <= w)",
          "Share of tokens whose top-k margin z(k) - z(k+1) is at most w, for each histogram edge w (the "
          "boundary mass of the soft-to-hard analysis). The share at w = eps is about the order-1 rate.",
          [(f"avg by (le) (smoothsmoe:boundary_mass:ratio5m{{{ML}}})", "w = {{le}}")], 0, 26, w=12,
          unit="percentunit"),
    Panel("Router margin quantiles",
          "The 10th and 50th percentiles of the margin z(k) - z(k+1), per layer (interpolated within the "
          "histogram's buckets).",
          [(f"smoothsmoe:router_margin:p10_5m{{{ML}}}", "p10 layer {{layer}}"),
           (f"smoothsmoe:router_margin:p50_5m{{{ML}}}", "p50 layer {{layer}}")], 12, 26, w=12),
    Panel("Expert load, top-k slots",
          "Tokens per second routed to each expert through its top-k slots (summed over the selected layers), "
          "one row per replica and expert: a replica's hot spots are its own. Dark rows are idle experts.",
          [(f'sum by (instance, expert) (smoothsmoe:expert_tokens:rate5m{{kind="topk", {ML}}})',
            "{{instance}} {{expert}}")], 0, 35,
          w=12, kind="heatmap"),
    Panel("Expert load, extra slots",
          "Tokens per second each expert receives as a smoothing extra. Extras go to the experts just below "
          "the k-th score, so this map follows the top-k one, fainter.",
          [(f'sum by (instance, expert) (smoothsmoe:expert_tokens:rate5m{{kind="extra", {ML}}})',
            "{{instance}} {{expert}}")], 12, 35,
          w=12, kind="heatmap"),
    Panel("Request rate",
          "Requests finished per second, by finish reason.",
          [(f"sum by (finished_reason) (rate(vllm:request_success_total{{{VM}}}[5m]))", "{{finished_reason}}")],
          0, 44, unit="reqps"),
    Panel("Time to first token",
          "TTFT percentiles over 5 minutes. The SLO alert fires when over 1 % of requests wait more than 2.5 s.",
          quantiles("vllm:time_to_first_token_seconds"), 8, 44, unit="s"),
    Panel("Inter-token latency",
          "Time between two generated tokens of a request, percentiles over 5 minutes.",
          quantiles("vllm:inter_token_latency_seconds"), 16, 44, unit="s"),
    Panel("End-to-end request latency",
          "From arrival to the last token, percentiles over 5 minutes.",
          quantiles("vllm:e2e_request_latency_seconds"), 0, 52, unit="s"),
    Panel("Tokens per second",
          "Prompt tokens prefilled and tokens generated, per second.",
          [(f"sum(rate(vllm:prompt_tokens_total{{{VM}}}[5m]))", "prompt"),
           (f"sum(rate(vllm:generation_tokens_total{{{VM}}}[5m]))", "generation")], 8, 52),
    Panel("Running and waiting requests",
          "Requests in the running batch and in the queue. A growing queue means the server is saturated.",
          [(f"sum(vllm:num_requests_running{{{VM}}})", "running"),
           (f"sum(vllm:num_requests_waiting{{{VM}}})", "waiting")], 16, 52),
    Panel("KV-cache use",
          "Share of the KV-cache blocks in use. Near 100 % the scheduler preempts requests.",
          [(f"avg(vllm:kv_cache_usage_perc{{{VM}}})", "KV cache")], 0, 60, w=24, h=6, unit="percentunit"),
]


def grafana_json() -> dict:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    panels, next_id = [], 1
    for title, y in ROWS:
        panels.append({"id": next_id, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        next_id += 1
    for p in PANELS:
        panel = {
            "id": next_id, "type": p.kind, "title": p.title, "description": p.description, "datasource": datasource,
            "gridPos": {"x": p.x, "y": p.y, "w": p.w, "h": p.h},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "datasource": datasource, "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(p.targets)],
            **p.extra,
        }
        if p.kind == "heatmap":
            panel["options"] = {"calculate": False, "yAxis": {"axisLabel": "expert"}, "color": {"scheme": "Viridis"}}
        panels.append(panel)
        next_id += 1
    return {
        "uid": "smoothsmoe", "title": "SmoothSMoE Serve", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["smoothsmoe", "vllm", "moe"], "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "description": "Expert overhead of smoothed top-k routing beside vLLM's serving metrics.",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "model", "type": "query", "datasource": datasource, "label": "Model",
             "query": {"query": "label_values(smoothsmoe_config_info, model)", "refId": "model"},
             "definition": "label_values(smoothsmoe_config_info, model)", "refresh": 2, "includeAll": True,
             "multi": True, "current": {"text": "All", "value": "$__all"}},
            {"name": "layer", "type": "query", "datasource": datasource, "label": "Layer",
             "query": {"query": "label_values(smoothsmoe_tokens_routed_total, layer)", "refId": "layer"},
             "definition": "label_values(smoothsmoe_tokens_routed_total, layer)", "refresh": 2, "includeAll": True,
             "multi": True, "sort": 3, "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(grafana_json(), indent=2) + "\n")
    print(f"wrote {OUT}")
