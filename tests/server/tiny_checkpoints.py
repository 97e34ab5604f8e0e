"""Tiny random Hugging Face checkpoints of several vLLM-supported MoE architectures.

``build_tiny(arch, out_dir)`` writes a complete checkpoint folder (config.json,
generation_config.json, model.safetensors, tokenizer files) of a real MoE
architecture, small enough for vLLM's CPU backend: it lets the tests check the
serving path on routers other than the default Qwen3-MoE one (shared experts,
no top-k renormalisation, grouped top-k, sigmoid scoring with a correction
bias, a routed scaling factor).

The weights are random (fixed seed, so a build is deterministic); the outputs
are gibberish. The router weights get std ``hidden_size**-0.5`` instead of the
usual 0.02: the router sees RMS-normalised hidden states, so its logits then
spread by ~1 per token and the routing differs from token to token.

The tokenizer is copied from the project's embedded default model, so every
checkpoint has ``vocab_size == VOCAB_SIZE`` (every id decodes), EOS id 2
(``<|im_end|>``) and pad id 0 (``<|endoftext|>``).

Shapes are chosen for vLLM's CPU backend: head_dim 64 (its attention refuses
16), hidden size 256 (its kernels want multiples of 32), two decoder layers,
both MoE. The DeepSeek models use MLA attention, whose CPU decode kernel only
handles a latent of 576 = kv_lora_rank 512 + qk_rope_head_dim 64.

Only torch, transformers, safetensors, the standard library and the project's
``default_model`` are imported.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
from smoothsmoe_server.models.default_model import (
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    ensure_default_model,
)

SEED = 20240602

# Common shape (see the module docstring for why).
HIDDEN_SIZE = 256
NUM_LAYERS = 2  # all of them MoE layers
NUM_ATTENTION_HEADS = 4
HEAD_DIM = HIDDEN_SIZE // NUM_ATTENTION_HEADS  # 64
MOE_INTERMEDIATE_SIZE = 128
INTERMEDIATE_SIZE = 512  # dense MLP size, unused since no layer is dense
MAX_POSITION_EMBEDDINGS = 2048
ROUTER_STD = HIDDEN_SIZE**-0.5
E_SCORE_BIAS_STD = 0.05  # DeepSeek-V3 correction bias: comparable to sigmoid score gaps

# MLA dims (DeepSeek). The CPU MLA decode kernel is compiled for a latent of
# kv_lora_rank + qk_rope_head_dim = 576 only; the rest is free.
KV_LORA_RANK = 512
QK_ROPE_HEAD_DIM = 64
QK_NOPE_HEAD_DIM = 64
V_HEAD_DIM = 64

# Per architecture: top_k, num_experts, num_moe_layers (and the routing flavour).
SHAPES: dict[str, dict] = {
    # softmax top-4 without renormalisation, plus a sigmoid-gated shared expert
    "qwen2_moe": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS},
    # softmax top-2, renormalised
    "mixtral": {"top_k": 2, "num_experts": 8, "num_moe_layers": NUM_LAYERS},
    # softmax top-4 without renormalisation
    "olmoe": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS},
    # softmax, group-limited greedy: 4 groups of 4, best 2 groups, top-4; 2 shared experts
    "deepseek_v2": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS, "n_group": 4, "topk_group": 2},
    # sigmoid + e_score_correction_bias (noaux_tc), 4 groups, best 2, top-4,
    # renormalised then scaled by routed_scaling_factor; 1 shared expert
    "deepseek_v3": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS, "n_group": 4, "topk_group": 2},
    # Granite MoE: softmax top-2, renormalised (its router is `router`)
    "granitemoe": {"top_k": 2, "num_experts": 8, "num_moe_layers": NUM_LAYERS},
    # GLM-4.5: sigmoid + correction bias, 4 groups, best 2, top-4, scaled; 1 shared expert
    "glm4_moe": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS, "n_group": 4, "topk_group": 2},
    # Phi-3.5-MoE: its own routing function (sparsemixer, top-2), which is none of the spec's
    # families: the layers stay stock, listed with the reason
    "phimoe": {"top_k": 2, "num_experts": 8, "num_moe_layers": NUM_LAYERS,
               "stock_reason": "computes none of the spec's families"},
    # gpt-oss: top-4 of the router logits (with a bias), softmax over those; biased experts
    "gpt_oss": {"top_k": 4, "num_experts": 8, "num_moe_layers": NUM_LAYERS},
    # Llama 4: top-1, sigmoid of the selected logit, applied to the expert's input: stock
    "llama4": {"top_k": 1, "num_experts": 8, "num_moe_layers": NUM_LAYERS,
               "stock_reason": "router weights applied to the input"},
    # Qwen3-Next: softmax top-4, renormalised, plus a gated shared expert; a Gated DeltaNet layer, then attention
    "qwen3_next": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS},
    # MiniMax-M2: sigmoid + correction bias, top-4, renormalised (stock vLLM's CPU router has no
    # ungrouped sigmoid branch: tests/server/arch_run.py gives its stock run vLLM's grouped one, one group)
    "minimax_m2": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS},
    # ERNIE 4.5: softmax with a correction bias, which no family has: stock
    "ernie4_5_moe": {"top_k": 4, "num_experts": 16, "num_moe_layers": NUM_LAYERS,
                     "stock_reason": "correction bias"},
}

ARCHITECTURES = {
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "phimoe": "PhiMoEForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "llama4": "Llama4ForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "minimax_m2": "MiniMaxM2ForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
}

# The architectures verified to load and generate on stock vLLM's CPU backend.
ARCHS: list[str] = ["qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "granitemoe", "glm4_moe", "phimoe",
                    "gpt_oss", "llama4", "qwen3_next", "minimax_m2", "ernie4_5_moe"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _common(arch: str) -> dict:
    return {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "dtype": "bfloat16",
    }


def _config(arch: str):
    s = SHAPES[arch]
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(
            **_common(arch),
            num_key_value_heads=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            num_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            shared_expert_intermediate_size=2 * MOE_INTERMEDIATE_SIZE,
            norm_topk_prob=False,
            rms_norm_eps=1e-6,
        )
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            **{**_common(arch), "intermediate_size": MOE_INTERMEDIATE_SIZE},  # Mixtral's experts use intermediate_size
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            num_local_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            rms_norm_eps=1e-5,
        )
    if arch == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(
            **{**_common(arch), "intermediate_size": MOE_INTERMEDIATE_SIZE},  # OLMoE's experts use intermediate_size
            num_key_value_heads=NUM_ATTENTION_HEADS,
            num_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            norm_topk_prob=False,
            rms_norm_eps=1e-5,
        )
    if arch in ("deepseek_v2", "deepseek_v3"):
        from transformers import DeepseekV2Config, DeepseekV3Config

        mla = {
            "num_key_value_heads": NUM_ATTENTION_HEADS,
            "kv_lora_rank": KV_LORA_RANK,
            "qk_rope_head_dim": QK_ROPE_HEAD_DIM,
            "qk_nope_head_dim": QK_NOPE_HEAD_DIM,
            "v_head_dim": V_HEAD_DIM,
            "moe_intermediate_size": MOE_INTERMEDIATE_SIZE,
            "n_routed_experts": s["num_experts"],
            "num_experts_per_tok": s["top_k"],
            "n_group": s["n_group"],
            "topk_group": s["topk_group"],
            "first_k_dense_replace": 0,
            "moe_layer_freq": 1,  # not a transformers field; vLLM reads it (published configs carry it)
            "rms_norm_eps": 1e-6,
        }
        if arch == "deepseek_v2":
            # DeepSeek-V2 style: no q LoRA (as V2-Lite), softmax scores, group-limited greedy.
            return DeepseekV2Config(
                **_common(arch),
                **mla,
                q_lora_rank=None,
                n_shared_experts=2,
                topk_method="group_limited_greedy",
                scoring_func="softmax",  # vLLM reads it; transformers' V2 always uses softmax
                norm_topk_prob=False,
                routed_scaling_factor=1.0,
            )
        # DeepSeek-V3 style: q LoRA, sigmoid scores + correction bias (noaux_tc).
        return DeepseekV3Config(
            **_common(arch),
            **mla,
            q_lora_rank=128,
            n_shared_experts=1,
            topk_method="noaux_tc",  # vLLM reads these two; transformers' V3 hard-codes them
            scoring_func="sigmoid",
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_nextn_predict_layers=0,  # no MTP layer in the checkpoint
        )
    if arch == "granitemoe":
        from transformers import GraniteMoeConfig

        return GraniteMoeConfig(
            **{**_common(arch), "intermediate_size": MOE_INTERMEDIATE_SIZE},  # the experts' size
            num_key_value_heads=2,
            num_local_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            rms_norm_eps=1e-6,
        )
    if arch == "glm4_moe":
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(
            **_common(arch),
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            n_routed_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            n_shared_experts=1,
            n_group=s["n_group"],
            topk_group=s["topk_group"],
            first_k_dense_replace=0,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            use_qk_norm=True,
            num_mtp_layers=0,
            rms_norm_eps=1e-5,
        )
    if arch == "phimoe":
        from transformers import PhimoeConfig

        return PhimoeConfig(
            **{**_common(arch), "intermediate_size": MOE_INTERMEDIATE_SIZE},  # the experts' size
            num_key_value_heads=2,
            num_local_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            rms_norm_eps=1e-5,
        )
    if arch == "gpt_oss":
        from transformers import GptOssConfig

        return GptOssConfig(
            **{**_common(arch), "intermediate_size": MOE_INTERMEDIATE_SIZE},  # the experts' size
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            num_local_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"],
            rms_norm_eps=1e-5,
        )
    if arch == "llama4":
        from transformers import Llama4TextConfig

        return Llama4TextConfig(
            **{**_common(arch), "intermediate_size": MOE_INTERMEDIATE_SIZE},  # the experts' size
            intermediate_size_mlp=INTERMEDIATE_SIZE,
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            num_local_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            interleave_moe_layer_step=1,
            use_qk_norm=True,
            attention_chunk_size=256,
            rms_norm_eps=1e-5,
        )
    if arch == "qwen3_next":
        from transformers import Qwen3NextConfig

        return Qwen3NextConfig(
            **_common(arch),
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
            linear_conv_kernel_dim=4,
            num_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            shared_expert_intermediate_size=MOE_INTERMEDIATE_SIZE,
            norm_topk_prob=True,
            rms_norm_eps=1e-6,
        )
    if arch == "minimax_m2":
        from transformers import MiniMaxM2Config

        return MiniMaxM2Config(
            **{**_common(arch), "intermediate_size": MOE_INTERMEDIATE_SIZE},  # the experts' size
            num_key_value_heads=2,
            head_dim=HEAD_DIM,
            num_local_experts=s["num_experts"],
            num_experts_per_tok=s["top_k"],
            rms_norm_eps=1e-6,
            scoring_func="sigmoid",  # vLLM reads these two; published configs carry them
            use_routing_bias=True,
            rotary_dim=HEAD_DIM // 2,
        )
    if arch == "ernie4_5_moe":
        from transformers import Ernie4_5_MoeConfig

        return Ernie4_5_MoeConfig(
            **_common(arch),
            num_key_value_heads=2,
            moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
            moe_num_experts=s["num_experts"],
            moe_k=s["top_k"],
            moe_num_shared_experts=0,
            moe_layer_start_index=0,
            moe_layer_interval=1,
            rms_norm_eps=1e-5,
        )
    raise ValueError(f"unknown arch {arch!r}; known: {sorted(SHAPES)}")


def build_tiny(arch: str, out_dir: pathlib.Path, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Write a tiny random checkpoint of ``arch`` (a key of :data:`SHAPES`) into ``out_dir``.

    ``out_dir`` is created if needed; its checkpoint files are overwritten.
    ``cache_dir`` is where the embedded default model (the tokenizer source)
    is found or built, as for ``ensure_default_model``. Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = pathlib.Path(out_dir)
    config = _config(arch)
    s = SHAPES[arch]
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(SEED + 1)
        n_router = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                # The routers: [num_experts, hidden] gate weights (not the
                # shared-expert MLPs' gate_proj, nor qwen2_moe's 1-wide shared_expert_gate).
                if name.endswith((".gate.weight", ".router.weight")) and \
                        tuple(p.shape) == (s["num_experts"], HIDDEN_SIZE):
                    p.copy_(torch.randn(p.shape, generator=gen) * ROUTER_STD)
                    n_router += 1
            for name, b in list(model.named_parameters()) + list(model.named_buffers()):
                if name.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn(b.shape, generator=gen) * E_SCORE_BIAS_STD)
        if n_router != s["num_moe_layers"]:
            raise RuntimeError(f"{arch}: found {n_router} routers, expected {s['num_moe_layers']}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # writes config.json and per-expert model.safetensors
    # transformers names the class its own way (PhimoeForCausalLM); vLLM's native class is what we test.
    config_path = out / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["architectures"] = [ARCHITECTURES[arch]]
    config_path.write_text(json.dumps(config_json, indent=2))
    GenerationConfig(eos_token_id=[EOS_TOKEN_ID, PAD_TOKEN_ID], pad_token_id=PAD_TOKEN_ID).save_pretrained(out)

    tok_src = ensure_default_model(cache_dir, progress=None)
    for fname in _TOKENIZER_FILES:
        if (tok_src / fname).exists():
            shutil.copyfile(tok_src / fname, out / fname)
    return out
