"""One vLLM engine on the tiny block-FP8 checkpoint (tests/server/fp8_checkpoint.py), in its own process.

    python -m tests.server.fp8_run MODEL_DIR ours|stock

Prints one JSON line: the prompt log-probabilities of PROMPTS (teacher-forced, float32 engine),
and, for `ours` (smoothing on at eps 0, this project's experts), each layer's snapshot entry and a
layer check: layer 0's experts, as the engine loaded and serves them, run on random inputs with
stock top-k ids, against moe_experts_torch on the checkpoint's own tensors (max abs difference and
the output's scale), plus whether the loaded weights equal the checkpoint's bit for bit. `stock`
is vLLM without the plugin: its own FP8 MoE path, which on the CPU needs AMX (its W8A16 kernel).
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = ["The morning was cold and clear, and the river carried a thin layer of mist down past the old mill.",
           "In the kitchen, she measured flour, sugar and butter into a large bowl, then added two eggs."]


def layer_check(worker, checkpoint: str) -> dict:
    """Runs in the engine's worker (collective_rpc): layer 0's served experts against the reference."""
    import torch

    from smoothsmoe_kernels import moe_experts, smooth_topk
    from tests.server.fp8_checkpoint import expert_weights

    runner = next(m for m in worker.model_runner.get_model().modules() if hasattr(m, "smoothsmoe_plan")
                  and m.smoothsmoe_plan.layer_index == 0)
    experts = runner.routed_experts
    ckpt = expert_weights(checkpoint, 0)
    loaded = {"w13": experts.w13_weight, "w13_scale": experts.w13_weight_scale_inv, "w2": experts.w2_weight,
              "w2_scale": experts.w2_weight_scale_inv}
    same = all(torch.equal(loaded[k].view(torch.uint8) if loaded[k].dtype == torch.float8_e4m3fn else loaded[k],
                           ckpt[k].view(torch.uint8) if ckpt[k].dtype == torch.float8_e4m3fn else ckpt[k])
               for k in loaded)
    g = torch.Generator().manual_seed(0)
    T, H = 37, experts.w13_weight.shape[2]  # an odd token count: the pairs per expert differ
    x = torch.randn(T, H, generator=g).to(runner.moe_config.in_dtype)
    logits = torch.randn(T, experts.w13_weight.shape[0], generator=g)
    top_k = runner.smoothsmoe_plan.config.top_k
    r = smooth_topk(logits, top_k, 0.0, 2, backend="torch")  # eps 0: stock top-k, two inactive slots (-1)
    with torch.inference_mode():
        served = experts.forward_modular(x=x, topk_weights=r.weights, topk_ids=r.ids).float()
        ref = moe_experts(x, ckpt["w13"], ckpt["w2"], r.ids, r.weights, w13_scale=ckpt["w13_scale"],
                          w2_scale=ckpt["w2_scale"], block_shape=(128, 128), backend="torch").float()
    return {"weights_as_checkpoint": same, "max_abs_diff": float((served - ref).abs().max()),
            "ref_scale": float(ref.abs().max()), "method": type(experts.quant_method).__name__,
            "vllm_fp8_backend": str(getattr(experts.quant_method, "fp8_backend", None))}


if __name__ == "__main__":
    model, mode = sys.argv[1], sys.argv[2]
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if mode == "ours":
        from smoothsmoe_server.options import SmoothingOptions

        os.environ.update(SmoothingOptions(eps="0", experts="smoothsmoe").to_env())
    else:
        os.environ["VLLM_PLUGINS"] = ""  # stock vLLM: no plugin at all
    import torch
    from vllm import LLM, SamplingParams

    ours = mode == "ours"
    extension = "smoothsmoe_server.engine.worker_extension.SmoothWorkerExtension" if ours else ""
    # bfloat16: vLLM's CPU FP8 MoE kernel (the stock side) takes bfloat16 activations only.
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0,
              enable_prefix_caching=False, worker_extension_cls=extension)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    out = {"amx": bool(torch.cpu._is_amx_tile_supported()),
           "logprobs": [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]}
    if ours:
        out["layers"] = llm.collective_rpc("smoothsmoe_snapshot")[0]["layers"]
        out["layer_check"] = llm.collective_rpc(layer_check, args=(model,))[0]
    print("RESULT " + json.dumps(out))
