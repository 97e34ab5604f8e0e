"""Stock vLLM (no plugin) scores a text, in its own process: the test's independent NLL.

    python -m tests.server.vllm_nll TEXT_FILE WINDOW MAX_TOKENS MODEL_DIR [MODEL_DIR ...]

Prints one JSON line, per model: the mean negative log-likelihood of the text's
tokens from vLLM's prompt logprobs, over consecutive windows of WINDOW tokens
(each window's first token is context only), and how many tokens that is.
The models are scored one after the other, each by its own engine.
"""

from __future__ import annotations

import gc
import json
import os
import sys

if __name__ == "__main__":
    text, window, max_tokens, models = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS="")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    results = {}
    for model in models:
        ids = AutoTokenizer.from_pretrained(model)(open(text).read(), add_special_tokens=False)["input_ids"]
        ids = ids[:max_tokens]
        chunks = [c for c in (ids[i:i + window] for i in range(0, len(ids), window)) if len(c) >= 2]
        llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  enable_prefix_caching=False)
        outs = llm.generate([{"prompt_token_ids": c} for c in chunks],
                            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
        logprobs = [out.prompt_logprobs[i][c[i]].logprob for c, out in zip(chunks, outs) for i in range(1, len(c))]
        results[model] = {"nll": -sum(logprobs) / len(logprobs), "tokens": len(logprobs)}
        del llm, outs
        gc.collect()
    print("RESULT " + json.dumps(results))
