"""Continuity in the served engine: a live MoE layer swept through a routing boundary.

GET /smoothsmoe/probe runs the engine's own layer (its gate weights, our
router, vLLM's experts kernel) on hidden states moved along a line through the
surface where the k-th and (k+1)-th experts tie, with steps of eps/10 and
eps/100, and returns the largest jump between neighbouring outputs.
"""

from __future__ import annotations

import httpx
import pytest
from smoothsmoe_server.models.default_model import NUM_LAYERS


@pytest.mark.parametrize("layer", range(NUM_LAYERS))
def test_smoothed_layer_moves_little_where_stock_jumps(smooth_server, layer):
    r = httpx.get(f"{smooth_server.url}/smoothsmoe/probe", params={"layer": layer}, timeout=120)
    assert r.status_code == 200, r.text
    p = r.json()
    coarse, fine = p["smoothed"]
    stock_coarse, stock_fine = p["stock"]
    # Stock top-k: the same jump (the expert swap) whatever the step.
    assert stock_fine > 0.7 * stock_coarse and stock_fine > 0.05 * p["output_norm"]
    # Smoothed: 10x smaller step, several times smaller largest jump. Not the
    # full 10x: the experts run in bfloat16, whose rounding of the inputs
    # adds a floor of small jumps.
    assert fine < 0.35 * coarse
    assert fine < 0.25 * stock_fine


def test_probe_answers_an_unknown_layer_404_naming_the_field(smooth_server):
    r = httpx.get(f"{smooth_server.url}/smoothsmoe/probe", params={"layer": 99}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 404 and error["param"] == "layer" and "no MoE layer 99" in error["message"]
    r = httpx.get(f"{smooth_server.url}/smoothsmoe/probe", params={"layer": 0, "seed": -1}, timeout=60)
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]  # vLLM answers validation errors 400


def test_probe_of_a_stock_layer_says_it_is_not_smoothed(nosmooth_server):
    r = httpx.get(f"{nosmooth_server.url}/smoothsmoe/probe", params={"layer": 0}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "layer", r.text
    assert error["message"] == "layer 0 is not smoothed: smoothing is off (--no-smoothing)"
    assert httpx.get(f"{nosmooth_server.url}/health", timeout=10).status_code == 200
