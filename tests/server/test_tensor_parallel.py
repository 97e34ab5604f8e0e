"""--tensor-parallel-size 2 on the CPU build: it starts with no thread binding given, stock routing
at TP=2 is stock vLLM at TP=2, every rank holds the same eps, and each token is counted once.

The servers start one after another (two ranks take both cores). `smoothsmoe serve` binds each
rank's threads itself (cpu_binding: this machine has one NUMA node, vLLM's own binding wants one
per rank), so no VLLM_CPU_OMP_THREADS_BIND is set for it; stock vLLM gets the binding by hand.

TP=2 is not token-identical to TP=1, even for stock vLLM without the plugin: the all-reduce of
the two shards sums in another order, and the default model's random weights leave near-ties in
its greedy choices (measured: the first tokens agree, then the texts part). So TP=2 is compared
token for token with stock vLLM at TP=2, and with TP=1 on the prompt's log-probabilities.
"""

from __future__ import annotations

import os
import sys

import httpx
import openai
import pytest
from smoothsmoe_server.commands.cpu_binding import split_cpus
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL
from smoothsmoe_server.models.default_model import ensure_default_model

from loadtests.server_process import ServerProcess
from loadtests.soak import scrape

PROMPTS = ["The morning was cold and", "Computer programs are", "1, 2, 3, 4,", "def main():\n   "]
# Smoothing at eps 0 equals stock at TP=1 (test_stock_identity); at TP=2 the router is the same
# code on each rank, so one smoothed server ("on") is started here, to keep CI short.
CONFIGS = {"off": ["--no-smoothing"], "on": []}


def greedy(url: str) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    return [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0.0).choices[0].text
            for p in PROMPTS]


def prompt_logprobs(url: str) -> list[float]:
    """Teacher-forced log-probabilities of the prompts' tokens (echo), all prompts in a row."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    out = []
    for p in PROMPTS:
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=1, temperature=0.0, echo=True, logprobs=0)
        out += [lp for lp in r.choices[0].logprobs.token_logprobs if lp is not None]
    return out


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, server_env, model_cache) -> dict[str, dict]:
    env = {k: v for k, v in server_env.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    argv = {name: [sys.executable, "-m", "smoothsmoe_server", "serve", "--tensor-parallel-size", "2", *flags]
            for name, flags in CONFIGS.items()}
    # Stock vLLM, no plugin, the same checkpoint and settings, threads bound by hand as its error asks.
    argv["stock"] = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
                     "--model", str(ensure_default_model(model_cache)), "--served-model-name", MODEL,
                     "--max-model-len", "2048", "--tensor-parallel-size", "2"]
    stock_env = {**env, "VLLM_PLUGINS": "", "VLLM_CPU_OMP_THREADS_BIND": split_cpus(sorted(os.sched_getaffinity(0)), 2)}
    out = {}
    for name, args in argv.items():
        server = ServerProcess(f"tp2-{name}", args, stock_env if name == "stock" else env,
                               tmp_path_factory.mktemp("logs"))
        try:
            before = scrape(server.url)
            texts = greedy(server.url)
            after = scrape(server.url)
            out[name] = {"texts": texts, "before": before, "after": after, "logprobs": prompt_logprobs(server.url),
                         "log": server.log_path.read_text(errors="replace")}
            if name != "stock":
                out[name]["eps"] = httpx.get(f"{server.url}/smoothsmoe/eps", timeout=30).json()["ranks"]
        finally:
            server.stop()
    return out


def test_it_binds_the_ranks_itself(tp2):
    import vllm.utils.cpu_resource_utils as cr_utils

    if len(cr_utils.get_visible_memory_node()) >= 2:  # a NUMA node a rank: vLLM's own binding works, none is set
        assert "VLLM_CPU_OMP_THREADS_BIND=" not in tp2["off"]["log"]
        return
    # The CPUs this process may run on (the server inherits them), halved: the first rank gets the odd one.
    cpus = sorted(os.sched_getaffinity(0))
    half = (len(cpus) + 1) // 2
    binding = ",".join(map(str, cpus[:half])) + "|" + ",".join(map(str, cpus[half:]))
    assert f"VLLM_CPU_OMP_THREADS_BIND={binding!r}" in tp2["off"]["log"]


def test_stock_routing_at_tp2_is_stock_vllm_at_tp2(tp2):
    assert tp2["off"]["texts"] == tp2["stock"]["texts"]  # exact: the same greedy tokens


def test_tp2_computes_the_model_of_tp1(tp2, nosmooth_server):
    tp1 = prompt_logprobs(nosmooth_server.url)
    for name in ("off", "stock"):
        assert len(tp2[name]["logprobs"]) == len(tp1)
        # bf16 activations summed in another order: log-probabilities agree to about 1e-2
        assert max(abs(a - b) for a, b in zip(tp2[name]["logprobs"], tp1)) < 0.05, name


def test_every_rank_routes_with_the_same_eps(tp2):
    ranks = tp2["on"]["eps"]
    assert len(ranks) == 2 and ranks[0] == ranks[1] and len(ranks[0]) == 4
    assert all(eps > 0 for eps in ranks[0].values())  # calibrated


@pytest.mark.parametrize("name", ["off", "on"])
def test_each_token_is_counted_once(tp2, name):
    before, after = tp2[name]["before"], tp2[name]["after"]
    engine = sum(after[k] - before[k] for k in ("prompt", "generated")) \
        - (after["cached"] - before["cached"]) - (after["requests"] - before["requests"])
    routed = {layer: after["routed"][layer] - before["routed"].get(layer, 0.0) for layer in after["routed"]}
    assert engine > 0 and set(routed.values()) == {engine}, (engine, routed)  # not doubled by the second rank
