"""The embedded default model with block-FP8 experts: a tiny checkpoint in the format of Qwen3's -FP8 ones.

``build_fp8(out_dir, cache_dir)`` copies the default model (tiny random Qwen3-MoE, H = 256,
I = 128: whole 128 x 128 blocks, as vLLM requires of I) and replaces every expert projection
``...mlp.experts.{e}.{gate,up,down}_proj.weight``, its blocks rescaled (spread_blocks), by its block quantization
(smoothsmoe_kernels.fp8_blocks.quantize_weight_blocks): float8_e4m3fn weights and a float32
``weight_scale_inv`` [N / 128, K / 128] beside each, the names and layout of the published
checkpoints. config.json gets their quantization_config (quant_method fp8, dynamic activations,
weight_block_size [128, 128]) with every other linear layer in ignored_layers (attention, the
router gate; lm_head is an embedding-like layer vLLM never quantizes with fp8): only the experts
are FP8, so vLLM's CPU build, which has no FP8 attention or dense linear kernels to speak of, runs
the rest as in the default model.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file
from smoothsmoe_server.models.default_model import NUM_LAYERS, ensure_default_model

from smoothsmoe_kernels.fp8_blocks import quantize_weight_blocks

BLOCK = (128, 128)
SEED = 20240625
EXPERT_PROJECTIONS = (".gate_proj.weight", ".up_proj.weight", ".down_proj.weight")


def is_expert_weight(name: str) -> bool:
    return ".mlp.experts." in name and name.endswith(EXPERT_PROJECTIONS)


def spread_blocks(w: torch.Tensor, block_shape, gen: torch.Generator) -> torch.Tensor:
    """w [N, K] with each weight block scaled by 2^j, j uniform in -2..3: blocks of very different
    magnitudes, so that a scale applied to the wrong block (or divided, not multiplied) changes the
    layer's output by a lot, and the experts' outputs (8x the default model's at most) move the logits."""
    bn, bk = block_shape
    j = torch.randint(-2, 4, (-(-w.shape[0] // bn), -(-w.shape[1] // bk)), generator=gen)
    factor = (2.0 ** j).repeat_interleave(bn, 0)[: w.shape[0]].repeat_interleave(bk, 1)[:, : w.shape[1]]
    return (w.float() * factor).to(w.dtype)  # powers of 2: exact in bfloat16


def quantization_config(block_shape=BLOCK) -> dict:
    ignored = [f"model.layers.{i}.{m}" for i in range(NUM_LAYERS)
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate")]
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block_shape),
            "ignored_layers": [*ignored, "lm_head"]}


def build_fp8(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              quant: dict | None = None) -> pathlib.Path:
    """Write the FP8 checkpoint into ``out_dir`` (created); returns it.

    quant: the quantization_config to write (default: quantization_config()); the weights are
    block-quantized at its weight_block_size, or at 128 x 128 without one (a per-tensor config
    then reads them with mismatched scales: for tests of what is refused, not of what is computed).
    """
    src = ensure_default_model(cache_dir, progress=None)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "smoothsmoe-complete.json"):  # not the default model
            shutil.copyfile(f, out / f.name)
    quant = quant or quantization_config()
    block_shape = tuple(quant.get("weight_block_size") or BLOCK)
    tensors = {}
    gen = torch.Generator().manual_seed(SEED)
    for name, w in load_file(src / "model.safetensors").items():
        if is_expert_weight(name):
            q, scale = quantize_weight_blocks(spread_blocks(w, block_shape, gen)[None], block_shape)  # [1, N, K]
            tensors[name], tensors[f"{name}_scale_inv"] = q[0], scale[0]
        else:
            tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def expert_weights(checkpoint: str | os.PathLike, layer: int) -> dict[str, torch.Tensor]:
    """One layer's experts as the checkpoint holds them, in vLLM's fused layout:
    w13 float8 [E, 2I, H] (gate rows, then up rows), w2 float8 [E, H, I] and their block scales."""
    t = load_file(pathlib.Path(checkpoint) / "model.safetensors")
    p = f"model.layers.{layer}.mlp.experts"
    E = sum(1 for n in t if n.startswith(f"{p}.") and n.endswith(".down_proj.weight"))

    def stack(proj, suffix):
        return torch.stack([t[f"{p}.{e}.{proj}.{suffix}"] for e in range(E)])

    return {"w13": torch.cat([stack("gate_proj", "weight"), stack("up_proj", "weight")], dim=1),
            "w13_scale": torch.cat([stack("gate_proj", "weight_scale_inv"), stack("up_proj", "weight_scale_inv")],
                                   dim=1),
            "w2": stack("down_proj", "weight"), "w2_scale": stack("down_proj", "weight_scale_inv")}
