"""One vLLM engine on a tiny checkpoint, in its own process (the plugin patches per process).

    python -m tests.server.arch_run MODEL_DIR stock|smooth

Prints one JSON line: the greedy token ids of PROMPTS at eps 0 (stock vLLM, or
smoothing on at eps 0 and width k + 2) and, for `smooth`, the per-layer routing
snapshot after a second pass at eps 0.5.
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = ["The morning was cold and", "Computer programs are"]

if __name__ == "__main__":
    model, mode = sys.argv[1], sys.argv[2]
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if mode == "smooth":
        from smoothsmoe_server.options import SmoothingOptions

        os.environ.update(SmoothingOptions(eps="0").to_env())
    else:
        os.environ["VLLM_PLUGINS"] = ""  # stock vLLM: no plugin at all
    from vllm import LLM, SamplingParams

    extension = "smoothsmoe_server.worker_extension.SmoothWorkerExtension" if mode == "smooth" else ""
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0,
              worker_extension_cls=extension)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    out = {"tokens": [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]}
    if mode == "smooth":
        layers = [s["layer"] for s in llm.collective_rpc("smoothsmoe_snapshot")[0]["layers"]]
        llm.collective_rpc("smoothsmoe_set_eps", args=({layer: 0.5 for layer in layers},))
        llm.collective_rpc("smoothsmoe_reset")
        llm.generate(PROMPTS, params, use_tqdm=False)
        out["snapshot"] = llm.collective_rpc("smoothsmoe_snapshot")[0]
    print("RESULT " + json.dumps(out))
