"""The plugin on vLLM's other MoE models: Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V2 and V3.

For each, a tiny random checkpoint runs once in stock vLLM and once with the
plugin. At eps 0 the smoothed router must route exactly as the family's stock
router (same greedy tokens: a wrong weight family, group rule, correction bias
or scaling factor would change them); at eps 0.5 every layer must be smoothed
and route extras.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from smoothsmoe_kernels import StatsLayout, read_stats
from tests.server.conftest import REPO
from tests.server.tiny_checkpoints import ARCHS, SHAPES, build_tiny


def run(model, mode, env) -> dict:
    p = subprocess.run([sys.executable, "-m", "tests.server.arch_run", str(model), mode], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("arch", ARCHS)
def test_plugin_routes_each_family(arch, tmp_path, model_cache, server_env):
    model = build_tiny(arch, tmp_path / arch, cache_dir=model_cache)
    stock, smooth = run(model, "stock", server_env), run(model, "smooth", server_env)
    assert smooth["tokens"] == stock["tokens"]
    shape = SHAPES[arch]
    if shape.get("stock_reason"):  # a routing no family gives: stock, listed with the reason, never guessed
        snapshot = smooth["snapshot"]
        assert snapshot["layers"] == [] and len(snapshot["uncounted"]) == shape["num_moe_layers"]
        assert all(shape["stock_reason"] in u["reason"] for u in snapshot["uncounted"])
        return
    layers = smooth["snapshot"]["layers"]
    assert len(layers) == shape["num_moe_layers"]
    for s in layers:
        assert s["smoothed"] and s["top_k"] == shape["top_k"] and s["num_experts"] == shape["num_experts"]
        st = read_stats(torch.tensor(s["stats"], dtype=torch.float64),
                        StatsLayout(s["top_k"], s["max_extra"], s["num_experts"], tuple(s["margin_edges"])))
        assert st.tokens > 0 and st.extras > 0 and st.active == shape["top_k"] * st.tokens + st.extras
