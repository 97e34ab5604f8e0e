"""The CPU load-test profile against the live server: the report's invariants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME, TOP_K, ensure_default_model

from loadtests.profiles import PROFILES
from loadtests.report import LATENCIES, save
from loadtests.run import run_profile
from loadtests.soak import run_soak, summary
from tests.server.conftest import API_KEY

BUDGET, MAX_EXTRA = 0.5, 2


def test_cpu_profile_report(smooth_server, model_cache, tmp_path):
    rows = run_profile(smooth_server.url, DEFAULT_MODEL_NAME, str(ensure_default_model(model_cache)),
                       PROFILES["short-chat"], concurrency=[1, 4], num_prompts=8, api_key=API_KEY)
    assert [r["load"] for r in rows] == ["c=1", "c=4"]
    for r in rows:
        assert r["completed"] == 8 and r["failed"] == 0 and r["error_rate"] == 0.0
        for m in LATENCIES:
            assert 0 < r[f"{m}_p50_ms"] <= r[f"{m}_p90_ms"] <= r[f"{m}_p99_ms"], (r["load"], m)
        assert r["request_throughput"] > 0 and r["output_throughput"] > 0
        assert r["goodput"] is not None and r["goodput"] <= r["request_throughput"] + 1e-9
        # Routing read off /metrics around the level: the extras stay near the budget.
        assert r["tokens_routed"] > 0
        assert TOP_K <= r["mean_active_experts"] <= TOP_K + MAX_EXTRA
        assert 0 < r["extras_per_token"] <= 1.5 * BUDGET
        assert abs(r["extra_overhead"] - r["extras_per_token"] / TOP_K) < 1e-9
        assert 0 < r["boundary_hit_rate"] <= 1
    json_path, png_path = save(rows, {"profile": "short-chat", "url": smooth_server.url}, tmp_path, "short-chat")
    assert json.loads(json_path.read_text())["levels"] == json.loads(json.dumps(rows))
    assert png_path.stat().st_size > 5_000


def test_short_soak_windows_and_counter_check(smooth_server, model_cache):
    """The soak tool on a short run (the hour-long run is documented, not in CI)."""
    windows = run_soak(smooth_server.url, DEFAULT_MODEL_NAME, str(ensure_default_model(model_cache)),
                       PROFILES["short-chat"], rate=2.0, duration_s=10.0, window_s=5.0, api_key=API_KEY,
                       server_pid=smooth_server.proc.pid)
    assert len(windows) == 2  # duration / window, whatever each window's start-up costs
    for w in windows:
        assert w.completed == 10 and w.failed == 0
        assert 0 < w.e2el_p50_ms <= w.e2el_p99_ms
        # The engine computed tokens (a short prompt is never fully cached), and every
        # layer routed each of them once: preemption is not expected at this load.
        assert w.engine_tokens > 0 and w.routed_min == w.routed_max == w.engine_tokens, w
        assert 0 < w.api_rss_mb < w.tree_rss_mb
    result = summary(windows)
    assert result["counters_add_up"] and result["failed"] == 0 and result["requests"] == 10 * len(windows)
    assert result["tree_rss_mb_ratio"] > 0


def test_installed_load_test_runs_a_dataset_file_from_any_directory(smooth_server, model_cache, tmp_path):
    """`smoothsmoe-loadtest` (the console script the install adds) from outside the repository, on a
    JSONL dataset: vLLM's dataset loader needs pandas, which the install brings."""
    script = Path(sys.executable).parent / "smoothsmoe-loadtest"
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n"
                               for i in range(4)))
    run = subprocess.run([str(script), "run", "--url", smooth_server.url, "--model", DEFAULT_MODEL_NAME,
                          "--tokenizer", str(ensure_default_model(model_cache)), "--api-key", API_KEY,
                          "--dataset", str(dataset), "--concurrency", "2", "--num-prompts", "4",
                          "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert report["levels"][0]["completed"] == 4 and report["levels"][0]["failed"] == 0


def test_compare_against_off_and_stock_vllm(server_env, tmp_path):
    """`compare --stock`: three servers one after the other (smoothing off, stock vLLM with no plugin,
    smoothing on), each level's ratios, and the goal read from the extra pairs measured with smoothing on."""
    script = Path(sys.executable).parent / "smoothsmoe-loadtest"
    run = subprocess.run([str(script), "compare", "--stock", "--concurrency", "1", "--num-prompts", "3",
                          "--out", str(tmp_path / "out")], cwd=tmp_path, env=server_env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = run.stdout
    for title in ("short-chat, smoothing off", "short-chat, stock vLLM", "short-chat, smoothing on",
                  "# ratios on / off", "# ratios off / stock vLLM", "# ratios on / stock vLLM"):
        assert title in out, out
    saved = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    rows = {name: saved[f"short-chat-{name}.json"]["levels"][0] for name in ("off", "stock", "on")}
    assert all(r["completed"] == 3 and r["failed"] == 0 for r in rows.values())
    assert rows["off"]["mean_active_experts"] == TOP_K and rows["off"]["extra_overhead"] == 0
    assert rows["stock"]["tokens_routed"] == 0  # no plugin: no smoothsmoe counters on its /metrics
    extra = rows["on"]["extra_overhead"]
    assert 0 < extra < 1
    # each ratio line: load, 6 ratios, then (with a goal) extra pairs, goal itl, goal req/s, met
    on_off = out.split("# ratios on / off")[1].splitlines()[3].split()
    assert on_off[0] == "c=1" and float(on_off[7]) == round(extra, 3) and on_off[-1] in ("yes", "NO")
    assert abs(float(on_off[8]) - (1 + extra + 0.03)) < 1e-3
