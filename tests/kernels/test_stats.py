"""The stats buffer counts what the spec's metrics table says, the same way the router does."""

from __future__ import annotations

import torch

from smoothsmoe_kernels import StatsLayout, accumulate, read_stats, routing_stats, smooth_topk
from smoothsmoe_kernels.stats import MARGIN_EDGES


def python_counts(r, k, E, rows):
    """Counts from a loop over tokens, the obvious way."""
    c = {"tokens": 0, "active": 0, "extras": 0, "capped": 0, "hits": {}, "topk": [0] * E, "extra": [0] * E,
         "buckets": [0] * (len(MARGIN_EDGES) + 1)}
    for t in rows:
        ids = [i for i in r.ids[t].tolist()]
        order = sum(1 for i in ids[k:] if i >= 0)
        c["tokens"] += 1
        c["active"] += k + order
        c["extras"] += order
        c["capped"] += int(r.capped[t])
        if order:
            c["hits"][order] = c["hits"].get(order, 0) + 1
        for i in ids[:k]:
            c["topk"][i] += 1
        for i in ids[k:]:
            if i >= 0:
                c["extra"][i] += 1
        margin = float(r.margin[t])
        c["buckets"][sum(1 for e in MARGIN_EDGES if margin > float(torch.tensor(e)))] += 1
    return c


def check(stats, c, m):
    assert (stats.tokens, stats.active, stats.extras, stats.capped) == (c["tokens"], c["active"], c["extras"], c["capped"])
    assert stats.hits_by_order == [c["hits"].get(o, 0) for o in range(1, m + 1)]
    assert stats.expert_tokens_topk == c["topk"] and stats.expert_tokens_extra == c["extra"]
    assert stats.margin_buckets == c["buckets"]


def test_counts_match_a_loop():
    torch.manual_seed(0)
    T, E, k, m = 500, 16, 2, 2
    scores = torch.randn(T, E)
    scores[::9] = float("nan")  # all -inf rows: margin 0
    scores[1::13, 3:] = float("-inf")  # only k finite scores: no (k+1)-th, margin reported as float max
    scores[1::13, :3] = torch.tensor([2.0, 1.0, float("-inf")])
    r = smooth_topk(scores, k, 0.6, m)
    stats = routing_stats(r, k, E)
    assert stats.hits_by_order[0] > 0 and stats.hits_by_order[1] > 0 and stats.capped > 0
    check(stats, python_counts(r, k, E, range(T)), m)
    assert stats.mean_active == stats.active / T
    finite = r.margin < 3e38
    torch.testing.assert_close(torch.tensor(stats.margin_sum, dtype=torch.float64), r.margin[finite].double().sum())


def test_padding_rows_are_not_counted_and_counts_add_up():
    torch.manual_seed(1)
    T, E, k, m = 64, 8, 1, 2
    r = smooth_topk(torch.randn(T, E), k, 0.8, m)
    layout = StatsLayout(top_k=k, max_extra=m, num_experts=E)
    buf = layout.new_buffer()
    valid = torch.arange(T) < 40  # the last 24 rows are padding
    accumulate(buf, layout, r, valid=valid)
    accumulate(buf, layout, r, valid=valid)
    stats = read_stats(buf, layout)
    once = python_counts(r, k, E, range(40))
    twice = {key: (v * 2 if isinstance(v, int) else [x * 2 for x in v] if isinstance(v, list) else {o: n * 2 for o, n in v.items()}) for key, v in once.items()}
    check(stats, twice, m)


def test_no_extras_layout():
    r = smooth_topk(torch.randn(10, 4), 2, 0.5, 0)
    s = routing_stats(r, 2, 4)
    assert s.hits_by_order == [] and s.extras == 0 and s.active == 20
