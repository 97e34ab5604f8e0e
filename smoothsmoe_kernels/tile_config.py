"""ExpertsTileConfig: the experts kernel's tile sizes, chosen by token count.

Three sources, in order:
  1. a tuned table for this GPU and layer shape (JSON in tuned/, beside the
     kernel), written by `python -m smoothsmoe_kernels.bench tune` on the GPU;
  2. otherwise `default_tile_config(T, E)`, the same rules as vLLM 0.32's bf16
     defaults for its fused MoE kernel (`get_default_config`);
  3. `CANDIDATES`, the short list the tuner times at each token bucket.

Why not `triton.autotune` on the kernels: BLOCK_M also shapes the tile
schedule, computed before the GEMM launches, so a per-kernel autotuner cannot
vary it; and an autotuner benchmarks on first use of a key, which inside a
CUDA-graph capture (vLLM captures decode) would break the capture. Tuning is
offline, lookup is a host-side dict read.

A table (one file per device and shape) maps token buckets to configs:
    {"device": "NVIDIA H100 80GB HBM3", "E": 128, "H": 2048, "I": 768, "dtype": "bfloat16",
     "configs": {"1": {"block_m": 16, ...}, "64": {...}, ...}}
and T takes the config of the nearest bucket, as vLLM reads its tables.
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


def table_name(device_name: str, E: int, H: int, I: int, dtype: torch.dtype) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"E={E},H={H},I={I},dtype={dtype_name},device={device_name.replace(' ', '_')}.json"


@lru_cache(maxsize=16)
def device_key(device: torch.device) -> str:
    """The device part of a table name: the GPU's name as CUDA reports it, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@lru_cache(maxsize=256)
def load_tile_table(
    device_name: str, E: int, H: int, I: int, dtype: torch.dtype, directory: Path = TUNED_DIR
) -> dict[int, ExpertsTileConfig] | None:
    """The tuned table for this device and shape: {token bucket: config}, or None.

    Read once per process and shape (the file is written offline by the tuner).
    A malformed table raises: a silently ignored one would hide a slow path.
    """
    path = Path(directory) / table_name(device_name, E, H, I, dtype)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    try:
        return {int(t): ExpertsTileConfig(**cfg) for t, cfg in data["configs"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed tuned table {path}: {e}") from e


def save_tile_table(
    table: dict[int, ExpertsTileConfig], device_name: str, E: int, H: int, I: int, dtype: torch.dtype,
    directory: Path = TUNED_DIR,
) -> Path:
    path = Path(directory) / table_name(device_name, E, H, I, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"device": device_name, "E": E, "H": H, "I": I, "dtype": str(dtype).removeprefix("torch."),
            "configs": {str(t): asdict(cfg) for t, cfg in sorted(table.items())}}
    path.write_text(json.dumps(data, indent=1) + "\n")
    load_tile_table.cache_clear()
    return path


def tile_config(T: int, E: int, H: int, I: int, dtype: torch.dtype, device: torch.device,
                directory: Path = TUNED_DIR) -> tuple[ExpertsTileConfig, str]:
    """The config for a call of T tokens, and where it came from ('tuned' or 'default')."""
    table = load_tile_table(device_key(device), E, H, I, dtype, Path(directory))
    if table:
        return table[min(table, key=lambda bucket: (abs(bucket - T), bucket))], "tuned"
    return default_tile_config(T, E), "default"

