"""A copy of the default model whose vocabulary holds a second "language": traffic that moves its routing.

The embedded default model has random weights, so any text routes alike: its
router sees the same statistics whatever the prompt (measured: mean extras per
token within about 10 % of the budget for prose, random ids, narrow or wide
vocabularies). Real traffic shifts move routing because real hidden states
have structure. This copy gives the top DRIFT_TOKENS ids of the vocabulary
embeddings that share one direction (a common vector plus DRIFT_NOISE of
noise): prompts drawn from those ids make hidden states that cluster, their
router margins narrow, and a band calibrated on prose holds more extras
there. The prose ids are untouched, so prose routes exactly as in the default
model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smoothsmoe_server.models.default_model import VOCAB_SIZE, ensure_default_model

DRIFT_TOKENS = 256  # ids VOCAB_SIZE - 256 .. VOCAB_SIZE - 1: rare merges, almost absent from prose
DRIFT_NOISE = 1.0  # noise relative to the shared direction: clustered, not collapsed
SEED = 7


def drift_token_ids() -> range:
    return range(VOCAB_SIZE - DRIFT_TOKENS, VOCAB_SIZE)


def ensure_drift_model(out: Path, cache_dir: Path | None = None) -> Path:
    """Build (once) the drift copy of the default model in `out`; return its path.

    `out/drift.json` records how it was made and `token_ids`: [first, stop) of the drift tokens,
    which is all a load test needs to know of it (`smoothsmoe drift-model DIR` builds it).
    """
    out = Path(out)
    marker = out / "drift.json"
    if marker.is_file() and "token_ids" in json.loads(marker.read_text()):
        return out
    base = ensure_default_model(cache_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    weights = load_file(str(tmp / "model.safetensors"))
    emb = weights["model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(SEED)
    ids = list(drift_token_ids())
    H = emb.shape[1]
    shared = torch.randn(H, generator=g)
    noise = torch.randn(len(ids), H, generator=g) * DRIFT_NOISE
    rows = (shared + noise).float()
    scale = emb.float().norm(dim=1).mean() / rows.norm(dim=1, keepdim=True)  # the default rows' norm
    emb[ids] = (rows * scale).to(emb.dtype)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    ids = drift_token_ids()
    (tmp / "drift.json").write_text(json.dumps({"tokens": DRIFT_TOKENS, "noise": DRIFT_NOISE, "seed": SEED,
                                                "token_ids": [ids.start, ids.stop]}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
