"""/metrics on the live smoothed server: the spec's names, consistent counts, the budget reached."""

from __future__ import annotations

import asyncio

import openai
import pytest
from smoothsmoe_server.models.calibration_prompts import CALIBRATION_PROMPTS
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL
from smoothsmoe_server.models.default_model import NUM_EXPERTS, NUM_LAYERS, TOP_K

from loadtests.metrics_scrape import metric_samples
from tests.server.conftest import API_KEY

BUDGET, MAX_EXTRA = 0.5, 2  # the server's defaults


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in metric_samples(url)}


def per_layer(m: dict, name: str) -> dict[int, float]:
    return {int(dict(labels)["layer"]): v for (n, labels), v in m.items() if n == name}


def run_calibration_prompts(url: str) -> None:
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=300) as client:
            # cache_salt: a prefix cache of its own, so the tokens are computed again
            # (and counted), not served from the start-up calibration's cache.
            await asyncio.gather(*(client.completions.create(model=MODEL, prompt=p, max_tokens=1, temperature=0.0,
                                                             extra_body={"cache_salt": "metrics-test"})
                                   for p in CALIBRATION_PROMPTS))

    asyncio.run(run())


@pytest.fixture(scope="module")
def calibration_delta(smooth_server):
    """Counters before and after the calibration prompts, and their difference."""
    before = scrape(smooth_server.url)
    run_calibration_prompts(smooth_server.url)
    # No wait: the prompts take about 0.18 s on 2 cores, and a scrape reads the counters after it
    # arrives (middleware.MetricsRefresh; a cache by age once showed the first scrape's here).
    after = scrape(smooth_server.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return before, after, delta


def test_mean_extras_meet_the_budget_on_the_calibration_prompts(calibration_delta):
    _, _, d = calibration_delta
    tokens = per_layer(d, "smoothsmoe_tokens_routed_total")
    active = per_layer(d, "smoothsmoe_active_experts_total")
    extras = per_layer(d, "smoothsmoe_extra_experts_total")
    assert sorted(tokens) == list(range(NUM_LAYERS))
    for layer, n in tokens.items():
        assert n > 500  # the prompts' tokens, computed, not from the prefix cache
        assert TOP_K <= active[layer] / n <= TOP_K + MAX_EXTRA
        assert active[layer] == TOP_K * n + extras[layer]
        # Calibrated at start-up on these prompts (with stock routing upstream):
        # within 20 % of the budget now that every layer is smoothed.
        assert abs(extras[layer] / n - BUDGET) <= 0.2 * BUDGET, (layer, extras[layer] / n)


def test_counts_are_consistent(calibration_delta):
    _, after, d = calibration_delta
    for layer, n in per_layer(d, "smoothsmoe_tokens_routed_total").items():
        lab = ("layer", str(layer))
        hits = {o: d[("smoothsmoe_boundary_hits_total", (lab, ("order", str(o))))] for o in range(1, MAX_EXTRA + 1)}
        assert hits[1] > 0  # boundary hits happen
        assert sum(o * h for o, h in hits.items()) == d[("smoothsmoe_extra_experts_total", (lab,))]
        assert d[("smoothsmoe_capped_tokens_total", (lab,))] <= n
        assert d[("smoothsmoe_router_margin_count", (lab,))] == n
        assert d[("smoothsmoe_router_margin_bucket", (lab, ("le", "+Inf")))] == n
        load = {kind: sum(v for (name, labels), v in d.items() if name == "smoothsmoe_expert_tokens_total"
                          and dict(labels)["layer"] == str(layer) and dict(labels)["kind"] == kind)
                for kind in ("topk", "extra")}
        assert load["topk"] == TOP_K * n and load["extra"] == d[("smoothsmoe_extra_experts_total", (lab,))]
        assert after[("smoothsmoe_epsilon", (lab,))] > 0
        assert after[("smoothsmoe_layer_smoothed", (lab,))] == 1.0


def test_label_sets_are_bounded_and_vllm_metrics_are_beside_ours(calibration_delta):
    _, after, _ = calibration_delta
    allowed = {"layer": {str(i) for i in range(NUM_LAYERS)}, "order": {str(o) for o in range(1, MAX_EXTRA + 1)},
               "expert": {str(e) for e in range(NUM_EXPERTS)}, "kind": {"topk", "extra"}, "experts": {"smoothsmoe", "vllm"}}
    for name, labels in after:
        if name.startswith("smoothsmoe_") and name != "smoothsmoe_config_info":
            for key, value in labels:
                if key != "le":
                    assert value in allowed[key], (name, key, value)
    info = [dict(labels) for (name, labels) in after if name == "smoothsmoe_config_info"]
    assert info == [{"top_k": str(TOP_K), "max_extra": "2", "budget": "0.5", "smoothing": "on", "model": MODEL}]
    assert any(name.startswith("vllm:") for name, _ in after)


def test_counters_never_go_down(calibration_delta):
    before, after, _ = calibration_delta
    for key, value in before.items():
        if key[0].endswith(("_total", "_count", "_bucket", "_sum")) and key[0].startswith("smoothsmoe_"):
            assert after[key] >= value, key
