"""One vLLM engine on a tiny checkpoint, in its own process (the plugin patches per process).

    python -m tests.server.arch_run MODEL_DIR stock|smooth|smooth-ours

Prints one JSON line: the greedy token ids of PROMPTS at eps 0 (stock vLLM, or
smoothing on at eps 0 and width k + 2, with this project's experts for
`smooth-ours`) and, smoothed, the per-layer routing
snapshot after a second pass at eps 0.5. The stock run is vLLM without the
plugin, except that sigmoid layers without expert groups, which vLLM's CPU
router cannot route, get vLLM's own grouped routine (fill_ungrouped_sigmoid).
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = ["The morning was cold and", "Computer programs are"]


def fill_ungrouped_sigmoid() -> None:
    """Route sigmoid layers without expert groups (MiniMax-M2) on vLLM's CPU router.

    Its CPU router has branches for grouped top-k, sqrt-softplus, a custom
    function and plain softmax, and asserts on anything else; on CUDA, vLLM
    routes such a layer with its fused sigmoid + bias top-k. vLLM's own grouped
    routine with a single group kept computes exactly that (sigmoid scores,
    top-k of score + bias, unbiased weights renormalized, scaled), so the stock
    run uses it for this one case and nothing else changes.
    """
    from vllm.model_executor.layers.fused_moe.router import cpu_router

    original = cpu_router.CPURouter._compute_routing

    def compute_routing(self, hidden_states, router_logits, indices_type, **kw):
        if not self.use_grouped_topk and self.scoring_func == "sigmoid" and self.custom_routing_function is None:
            return cpu_router._grouped_topk(router_logits, self.top_k, self.renormalize, 1, 1, "sigmoid",
                                            self.routed_scaling_factor, self.e_score_correction_bias)
        return original(self, hidden_states, router_logits, indices_type, **kw)

    cpu_router.CPURouter._compute_routing = compute_routing


if __name__ == "__main__":
    model, mode = sys.argv[1], sys.argv[2]
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if mode in ("smooth", "smooth-ours"):  # smooth-ours: this project's experts (--smooth-experts smoothsmoe)
        from smoothsmoe_server.options import SmoothingOptions

        experts = "smoothsmoe" if mode == "smooth-ours" else "auto"
        os.environ.update(SmoothingOptions(eps="0", experts=experts).to_env())
    else:
        os.environ["VLLM_PLUGINS"] = ""  # stock vLLM: no plugin at all
        fill_ungrouped_sigmoid()
    from vllm import LLM, SamplingParams

    smooth = mode != "stock"
    extension = "smoothsmoe_server.engine.worker_extension.SmoothWorkerExtension" if smooth else ""
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0,
              worker_extension_cls=extension)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    out = {"tokens": [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]}
    if smooth:
        layers = [s["layer"] for s in llm.collective_rpc("smoothsmoe_snapshot")[0]["layers"]]
        llm.collective_rpc("smoothsmoe_set_eps", args=({layer: 0.5 for layer in layers},))
        llm.collective_rpc("smoothsmoe_reset")
        llm.generate(PROMPTS, params, use_tqdm=False)
        out["snapshot"] = llm.collective_rpc("smoothsmoe_snapshot")[0]
    print("RESULT " + json.dumps(out))
