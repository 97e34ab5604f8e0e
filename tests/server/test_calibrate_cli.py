"""`smoothsmoe calibrate` end to end on the default model, and the eps file it writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from smoothsmoe_server.engine.eps import EpsPlan
from smoothsmoe_server.models.calibration_prompts import CALIBRATION_PROMPTS
from smoothsmoe_server.models.default_model import NUM_LAYERS, TOP_K, ensure_default_model


def test_calibrate_writes_per_layer_eps(tmp_path, model_cache, server_env):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in CALIBRATION_PROMPTS))
    out = tmp_path / "eps.json"
    env = {**server_env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # one process: faster to start
    run = subprocess.run(
        [sys.executable, "-m", "smoothsmoe_server", "calibrate", "--model", str(ensure_default_model(model_cache)),
         "--prompts", str(prompts), "--out", str(out), "--max-model-len", "512", "--enforce-eager"],
        env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["budget"] == 0.5 and data["prompts"] == len(CALIBRATION_PROMPTS)
    assert sorted(int(k) for k in data["layers"]) == list(range(NUM_LAYERS))
    for layer in data["layers"].values():
        assert layer["eps"] > 0 and layer["reached"] and layer["tokens"] > 500
        # bfloat16 router logits tie often, so the count steps by more than 1/N
        assert 0.5 <= layer["mean_extras"] < 0.55
    table = [line.split() for line in run.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(table) == NUM_LAYERS
    assert all(float(row[3]) == pytest.approx(TOP_K + 0.5, abs=0.05) for row in table)  # mean active experts
    plan = EpsPlan.parse(str(out))  # the file feeds --smooth-eps
    assert plan.initial(0) == data["layers"]["0"]["eps"]


def test_eps_plan_forms(tmp_path):
    assert EpsPlan.parse("auto").auto and EpsPlan.parse("auto").initial(3) == 0.0
    assert EpsPlan.parse("0.25").initial(7) == 0.25
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": {"0": -1}}')
    for spec in ("-1", "nan", "inf", "no-such-file.json", str(bad)):
        with pytest.raises(ValueError):
            EpsPlan.parse(spec)
    partial = tmp_path / "partial.json"
    partial.write_text('{"layers": {"0": 0.1}}')
    with pytest.raises(ValueError, match="no value for MoE layer 1"):
        EpsPlan.parse(str(partial)).initial(1)
