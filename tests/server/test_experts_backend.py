"""--smooth-experts smoothsmoe: this project's experts (active pairs only) inside vLLM.

On the CPU the torch reference computes the pairs (on CUDA the Triton kernel
would). A server with our experts is compared with the shared smoothed server
(vLLM's experts kernel, padded slots) at exactly the same per-layer eps, read
off that server's /metrics: same routing, so the outputs may differ only by
bfloat16 rounding (the two compute the same sums in different orders).
"""

from __future__ import annotations

import json
import sys

import httpx
import pytest
from smoothsmoe_server.models.calibration_prompts import CALIBRATION_PROMPTS
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from loadtests.metrics_scrape import metric_samples
from loadtests.server_process import ServerProcess
from tests.server.conftest import API_KEY

PROMPTS = CALIBRATION_PROMPTS[:16]


def layer_eps(url: str) -> dict[str, float]:
    return {s.labels["layer"]: s.value for s in metric_samples(url) if s.name == "smoothsmoe_epsilon"}


@pytest.fixture(scope="module")
def ours_server(smooth_server, tmp_path_factory, server_env):
    eps = layer_eps(smooth_server.url)
    assert eps and all(v > 0 for v in eps.values())
    eps_file = tmp_path_factory.mktemp("eps") / "eps.json"
    eps_file.write_text(json.dumps({"layers": eps}))
    argv = [sys.executable, "-m", "smoothsmoe_server", "serve", "--smooth-experts", "smoothsmoe",
            "--smooth-eps", str(eps_file), "--enforce-eager"]
    s = ServerProcess("ours", argv, server_env, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


def complete(url: str, prompt: str, key: str | None = None) -> tuple[list[float], str]:
    """(teacher-forced log-probabilities of the prompt's tokens, greedy continuation)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0.0, "prompt_logprobs": 0})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    logprobs = [next(iter(d.values()))["logprob"] for d in choice["prompt_logprobs"][1:]]
    return logprobs, choice["text"]


def layer_experts(url: str) -> dict[str, str]:
    return {s.labels["layer"]: s.labels["experts"] for s in metric_samples(url)
            if s.name == "smoothsmoe_layer_experts" and s.value == 1}


def test_every_smoothed_layer_uses_our_experts(ours_server, smooth_server):
    eps = layer_eps(ours_server.url)
    assert eps == layer_eps(smooth_server.url)
    assert layer_experts(ours_server.url) == dict.fromkeys(eps, "smoothsmoe")
    assert layer_experts(smooth_server.url) == dict.fromkeys(eps, "vllm")  # auto on the CPU
    said = [line for line in smooth_server.log_path.read_text(errors="replace").splitlines()
            if "smoothed, top_k 4 -> width 6, experts: vllm (auto on the CPU: vLLM's kernel computes" in line]
    assert len(said) == len(eps), said  # the log says why auto chose vLLM's experts, layer by layer


def test_outputs_agree_with_vllms_experts_within_bf16_rounding(ours_server, smooth_server):
    diffs, same_text = [], 0
    for prompt in PROMPTS:
        ours, ours_text = complete(ours_server.url, prompt)
        theirs, their_text = complete(smooth_server.url, prompt, API_KEY)
        assert len(ours) == len(theirs)
        diffs += [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
        same_text += ours_text == their_text
    # Measured: max 0.012, mean 0.0012 over 1268 tokens at eps 0.1. bf16 keeps
    # 8 bits: a few roundings of a logit of size ~10 move it by ~0.04 at worst,
    # and the two paths round in different places. A wrong pair (a dropped or
    # double-counted expert) moves log-probabilities by whole units.
    assert max(diffs) < 0.05 and sum(diffs) / len(diffs) < 0.005, (max(diffs), sum(diffs) / len(diffs))
    # Greedy text may part ways where two tokens are within rounding; most agree.
    assert same_text >= 0.75 * len(PROMPTS)


def test_routing_counts_and_continuity_with_our_experts(ours_server):
    before = metric_samples(ours_server.url)
    complete(ours_server.url, CALIBRATION_PROMPTS[0])
    # No wait: a scrape reads the counters after it arrives (middleware.MetricsRefresh).
    after = metric_samples(ours_server.url)

    def total(samples, name):
        return sum(s.value for s in samples if s.name == name)

    assert total(after, "smoothsmoe_tokens_routed_total") > total(before, "smoothsmoe_tokens_routed_total")
    probe = httpx.get(f"{ours_server.url}/smoothsmoe/probe", params={"layer": 0}, timeout=120).json()
    coarse, fine = probe["smoothed"]
    assert fine < coarse < probe["stock"][0] and fine < 0.5 * probe["stock"][1]
