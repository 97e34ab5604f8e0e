"""The plugin on vLLM's other MoE models (tests/server/tiny_checkpoints.ARCHS).

For each, a tiny random checkpoint runs once in stock vLLM and once with the
plugin, in two processes at once (each engine start is mostly one core's
work). At eps 0 the smoothed router must route exactly as the family's stock
router (same greedy tokens: a wrong weight family, group rule, correction bias
or scaling factor would change them); at eps 0.5 every layer must be smoothed
and route extras. A model whose routing no family gives must stay stock, with
the reason in the snapshot or the log.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from smoothsmoe_server.api.metrics import RoutingMetrics

from smoothsmoe_kernels import StatsLayout, read_stats
from tests.server.conftest import REPO
from tests.server.tiny_checkpoints import ARCHS, SHAPES, build_tiny


def run_both(model, env, smooth_mode="smooth") -> tuple[dict, dict, str]:
    """Stock and smoothed runs of `model`, side by side: (stock result, smoothed result, smoothed run's log)."""
    procs = {mode: subprocess.Popen([sys.executable, "-m", "tests.server.arch_run", str(model), mode], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("stock", smooth_mode)}
    results, logs = {}, {}
    for mode, p in procs.items():
        out, err = p.communicate(timeout=600)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"{mode}: " + out[-2000:] + err[-4000:]
        results[mode], logs[mode] = json.loads(lines[-1][len("RESULT "):]), out + err
    return results["stock"], results[smooth_mode], logs[smooth_mode]


@pytest.mark.parametrize("arch", ARCHS)
def test_plugin_routes_each_family(arch, tmp_path, model_cache, server_env):
    model = build_tiny(arch, tmp_path / arch, cache_dir=model_cache)
    stock, smooth, log = run_both(model, server_env)
    assert smooth["tokens"] == stock["tokens"]
    shape = SHAPES[arch]
    # What /metrics exports from this snapshot: every MoE layer named, 1 if smoothed, 0 if stock.
    metrics = RoutingMetrics()
    metrics.update(smooth["snapshot"])
    family = next(f for f in metrics.collect() if f.name == "smoothsmoe_layer_smoothed")
    exported = sorted((int(s.labels["layer"]), s.value) for s in family.samples)
    smoothed = 0.0 if shape.get("stock_reason") else 1.0
    assert exported == [(i, smoothed) for i in range(shape["num_moe_layers"])]
    if shape.get("stock_reason"):  # a routing no family gives, or one we cannot run: stock, with the reason
        snapshot = smooth["snapshot"]
        uncounted, counted = snapshot["uncounted"], snapshot["layers"]
        # Listed either way: uncounted (vLLM's router is not one we can count) or counted at top-k.
        assert len(uncounted) + len(counted) == shape["num_moe_layers"]
        assert all(not s["smoothed"] and s["max_extra"] == 0 for s in counted)
        assert all(shape["stock_reason"] in u["reason"] for u in uncounted)
        said = [line for line in log.splitlines()
                if "keeps stock top-k routing" in line and shape["stock_reason"] in line]
        assert len(said) == shape["num_moe_layers"], log[-3000:]
        return
    assert_every_layer_routes_extras(smooth["snapshot"]["layers"], shape)


def test_llama4_is_smoothed_by_this_projects_experts(tmp_path, model_cache, server_env):
    """Llama 4 applies its router weights to the experts' input, which vLLM's experts do at top-k 1 only;
    this project's experts (--smooth-experts smoothsmoe, the default on CUDA) do it per slot, so with them
    every layer is smoothed, and eps 0 still gives stock vLLM's tokens."""
    model = build_tiny("llama4", tmp_path / "llama4", cache_dir=model_cache)
    stock, smooth, _ = run_both(model, server_env, smooth_mode="smooth-ours")
    assert smooth["tokens"] == stock["tokens"]
    assert all(s["experts"] == "smoothsmoe" for s in smooth["snapshot"]["layers"])
    assert_every_layer_routes_extras(smooth["snapshot"]["layers"], SHAPES["llama4"])


def assert_every_layer_routes_extras(layers, shape):
    assert len(layers) == shape["num_moe_layers"]
    for s in layers:
        assert s["smoothed"] and s["top_k"] == shape["top_k"] and s["num_experts"] == shape["num_experts"]
        st = read_stats(torch.tensor(s["stats"], dtype=torch.float64),
                        StatsLayout(s["top_k"], s["max_extra"], s["num_experts"], tuple(s["margin_edges"])))
        assert st.tokens > 0 and st.extras > 0 and st.active == shape["top_k"] * st.tokens + st.extras
