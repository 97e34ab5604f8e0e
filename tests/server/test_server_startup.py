"""`smoothsmoe serve` starts through vLLM's own launcher, so vLLM's server options take effect.

Until 2026-11 the server rebuilt vLLM's launch by hand and dropped what vLLM's
run_server_worker does before building the app, e.g. importing --reasoning-parser-plugin and
--tool-parser-plugin files: the option parsed, and nothing happened.
"""

from __future__ import annotations

import httpx


def test_a_vllm_option_the_hand_copy_dropped_takes_effect(nosmooth_server):
    # The plugin file writes its marker when imported; vLLM's launcher imports it at start-up.
    assert nosmooth_server.plugin_marker.read_text() == "imported by the API server"


def test_our_routes_come_from_the_endpoint_plugin(nosmooth_server):
    log = nosmooth_server.log_path.read_text(errors="replace")
    assert "Loaded endpoint plugin smoothsmoe" in log
    eps = httpx.get(f"{nosmooth_server.url}/smoothsmoe/eps", timeout=30)
    assert eps.status_code == 200 and eps.json() == {"ranks": [{}]}  # --no-smoothing: no smoothed layer
