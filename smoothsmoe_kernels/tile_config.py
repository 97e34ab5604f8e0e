"""ExpertsTileConfig: the experts kernel's tile sizes, chosen by token count.

Three sources, in order:
  1. a tuned table for this GPU and layer shape (JSON in tuned/, beside the
     kernel), written by `python -m smoothsmoe_kernels.bench tune` on the GPU;
  2. otherwise `default_tile_config(T, E)`, the same rules as vLLM 0.32's bf16
     defaults for its fused MoE kernel (`get_default_config`), or for FP8
     block-quantized experts `default_fp8_tile_config`, the rules of its
     block-wise FP8 branch;
  3. `CANDIDATES` (`FP8_CANDIDATES`), the short list the tuner times at each token bucket.

Why not `triton.autotune` on the kernels: BLOCK_M also shapes the tile
schedule, computed before the GEMM launches, so a per-kernel autotuner cannot
vary it; and an autotuner benchmarks on first use of a key, which inside a
CUDA-graph capture (vLLM captures decode) would break the capture. Tuning is
offline, lookup is a host-side dict read.

A table (one file per device and shape) maps token buckets to configs:
    {"device": "NVIDIA H100 80GB HBM3", "E": 128, "H": 2048, "I": 768, "dtype": "bfloat16",
     "configs": {"1": {"block_m": 16, ...}, "64": {...}, ...}}
and T takes the config of the nearest bucket, as vLLM reads its tables. FP8 tables
are named and marked by their weight blocks instead of the activations' dtype
("dtype": "fp8_w8a8", "block_shape": [128, 128]).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).parent / "tuned"
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True, slots=True)
class ExpertsTileConfig:
    """Tile sizes of one experts-kernel call (both GEMMs share BLOCK_M: the schedule's)."""

    block_m: int  # pairs per tile: the schedule's rows
    block_n: int  # output columns per program (the gate-up GEMM's are half gate, half up)
    block_k: int  # reduction step
    group_m: int = 1  # row tiles swizzled together so they share weight tiles in L2
    num_warps: int = 4
    num_stages: int = 3
    # Both GEMMs computed transposed (weights x activations): the weight tile takes the tensor
    # core's M side, which on Hopper is at least 64 wide, so a decode-sized BLOCK_M of 16 does not
    # leave it three-quarters empty; vLLM's enable_swap_ab does this for FP8 on sm90.
    swap_ab: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "group_m"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of 2, got {v}")
        if self.block_m < 16 or self.block_n < 32 or self.block_k < 16:
            raise ValueError(f"tl.dot needs block_m >= 16, block_n >= 32 (two halves of 16), block_k >= 16: {self}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps / num_stages: {self}")


def default_tile_config(T: int, E: int) -> ExpertsTileConfig:
    """vLLM's bf16 defaults by token count: memory-bound small T wants tall K tiles,
    large T wants large M/N tiles and more warps; grouping pays when an expert
    has enough row tiles to share its weights."""
    block_m = 16 if T <= 32 else 32 if T <= 96 else 64 if T <= 512 else 128
    return ExpertsTileConfig(
        block_m=block_m,
        block_n=64 if T <= 64 else 128,
        block_k=128 if T <= 64 else 64,
        group_m=16 if T // max(E, 1) > 128 else 1,
        num_warps=4 if T <= 128 else 8,
        num_stages=4 if T <= 32 else 3,
    )


def default_fp8_tile_config(T: int, E: int, block_shape: tuple[int, int], sm90: bool = False) -> ExpertsTileConfig:
    """vLLM's defaults for block-wise FP8 (get_default_config, its fp8_w8a8 + block_shape branch, CUDA):
    a 16-row M tile up to 64 tokens; a 64-wide N tile up to 8 tokens (more programs on a
    memory-bound GEMM), 128 above; the K tile one scale block (bk), so each K step reads one
    activation scale and one weight scale per column; swap_ab on sm90 under a 64-row M tile.
    E is unused: the rules do not depend on it (kept for the same call as default_tile_config)."""
    del E
    small = T <= 8
    block_m = 16 if T <= 64 else 64
    block_n = 64 if small else 128
    return ExpertsTileConfig(
        block_m=block_m,
        block_n=block_n,
        block_k=block_shape[1],
        group_m=1 if T <= 16 else 32,
        num_warps=4,
        num_stages=(4 if T <= 4 else 3) if small else 3,
        swap_ab=sm90 and block_m < 64 and block_n >= 64,
    )


# The tuner's list: vLLM's default at each regime, and its neighbours in each dimension.
CANDIDATES = (
    ExpertsTileConfig(16, 64, 128, 1, 4, 4),
    ExpertsTileConfig(16, 128, 128, 1, 4, 4),
    ExpertsTileConfig(16, 64, 64, 1, 4, 3),
    ExpertsTileConfig(32, 64, 128, 1, 4, 4),
    ExpertsTileConfig(32, 128, 64, 1, 4, 3),
    ExpertsTileConfig(64, 64, 64, 1, 4, 3),
    ExpertsTileConfig(64, 128, 64, 1, 8, 3),
    ExpertsTileConfig(64, 128, 64, 16, 8, 3),
    ExpertsTileConfig(128, 128, 64, 1, 8, 3),
    ExpertsTileConfig(128, 128, 64, 16, 8, 3),
    ExpertsTileConfig(128, 64, 64, 16, 4, 4),
    ExpertsTileConfig(128, 128, 128, 16, 8, 3),
)


# FP8 (128 x 128 blocks): K tile = the scale block; N tiles whose gate-up halves hold whole
# 128-groups of h (256: h quantized in the gate-up kernel) or not (h quantized as the down
# kernel loads it); swapped and plain at the small M tiles.
FP8_CANDIDATES = (
    ExpertsTileConfig(16, 64, 128, 1, 4, 4),
    ExpertsTileConfig(16, 64, 128, 1, 4, 4, swap_ab=True),
    ExpertsTileConfig(16, 128, 128, 1, 4, 3),
    ExpertsTileConfig(16, 128, 128, 1, 4, 3, swap_ab=True),
    ExpertsTileConfig(16, 256, 128, 1, 4, 3, swap_ab=True),
    ExpertsTileConfig(32, 128, 128, 1, 4, 3, swap_ab=True),
    ExpertsTileConfig(64, 128, 128, 32, 4, 3),
    ExpertsTileConfig(64, 256, 128, 32, 8, 3),
    ExpertsTileConfig(128, 128, 128, 32, 8, 3),
    ExpertsTileConfig(128, 256, 128, 32, 8, 3),
)


def table_name(device_name: str, E: int, H: int, I: int, dtype: torch.dtype,
               block_shape: tuple[int, int] | None = None) -> str:
    """The file name of a tuned table; FP8 ones by weight blocks (whatever the activations' dtype)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if block_shape is not None:
        dtype_name = f"fp8_w8a8,block_shape=[{block_shape[0]},{block_shape[1]}]"
    return f"E={E},H={H},I={I},dtype={dtype_name},device={device_name.replace(' ', '_')}.json"


@lru_cache(maxsize=16)
def device_key(device: torch.device) -> str:
    """The device part of a table name: the GPU's name as CUDA reports it, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@lru_cache(maxsize=16)
def is_sm90(device: torch.device) -> bool:
    """Hopper (H100, H200): where vLLM swaps its FP8 GEMMs' operands at small M tiles."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


@lru_cache(maxsize=256)
def load_tile_table(
    device_name: str, E: int, H: int, I: int, dtype: torch.dtype, directory: Path = TUNED_DIR,
    block_shape: tuple[int, int] | None = None,
) -> dict[int, ExpertsTileConfig] | None:
    """The tuned table for this device and shape (FP8: and weight blocks): {token bucket: config}, or None.

    Read once per process and shape (the file is written offline by the tuner).
    A malformed table raises: a silently ignored one would hide a slow path.
    """
    path = Path(directory) / table_name(device_name, E, H, I, dtype, block_shape)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    try:
        return {int(t): ExpertsTileConfig(**cfg) for t, cfg in data["configs"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed tuned table {path}: {e}") from e


def save_tile_table(
    table: dict[int, ExpertsTileConfig], device_name: str, E: int, H: int, I: int, dtype: torch.dtype,
    directory: Path = TUNED_DIR, block_shape: tuple[int, int] | None = None,
) -> Path:
    path = Path(directory) / table_name(device_name, E, H, I, dtype, block_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"device": device_name, "E": E, "H": H, "I": I,
            "dtype": "fp8_w8a8" if block_shape else str(dtype).removeprefix("torch.")}
    if block_shape:
        data["block_shape"] = list(block_shape)
    data["configs"] = {str(t): asdict(cfg) for t, cfg in sorted(table.items())}
    path.write_text(json.dumps(data, indent=1) + "\n")
    load_tile_table.cache_clear()
    return path


def tile_config(T: int, E: int, H: int, I: int, dtype: torch.dtype, device: torch.device,
                directory: Path = TUNED_DIR, block_shape: tuple[int, int] | None = None,
                ) -> tuple[ExpertsTileConfig, str]:
    """The config for a call of T tokens, and where it came from ('tuned' or 'default').

    block_shape: FP8 block-quantized weights' (bn, bk), None for unquantized ones.
    """
    table = load_tile_table(device_key(device), E, H, I, dtype, Path(directory), block_shape)
    if table:
        return table[min(table, key=lambda bucket: (abs(bucket - T), bucket))], "tuned"
    if block_shape is not None:
        return default_fp8_tile_config(T, E, block_shape, is_sm90(device)), "default"
    return default_tile_config(T, E), "default"

