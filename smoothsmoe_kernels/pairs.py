"""group_pairs_by_expert(): the active (token, expert) pairs, sorted by expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ExpertPairs:
    """Active (token, slot) pairs grouped by expert.

    Example: ids = [[3, 0], [0, -1]] (T=2, W=2, E=4) has three active pairs;
    sorted by expert (stable, so token order is kept within an expert):
        expert 0: flat slots 1 (token 0) and 2 (token 1); expert 3: slot 0 (token 0)
        flat_slot = [1, 2, 0], token = [0, 1, 0], offsets = [0, 2, 2, 2, 3]
    """

    flat_slot: torch.Tensor  # [P] int64, index into ids.view(-1) / weights.view(-1)
    token: torch.Tensor  # [P] int64, the token of each pair
    offsets: torch.Tensor  # [E+1] int64, pairs of expert e are offsets[e]:offsets[e+1]

    @property
    def num_pairs(self) -> int:
        return self.flat_slot.numel()


def group_pairs_by_expert(ids: torch.Tensor, num_experts: int) -> ExpertPairs:
    """Group the active slots of `ids` [T, W] (-1 = inactive) by expert id.

    The number of pairs is data-dependent, so this syncs with the host; it is
    the reference and CPU path, where that is fine.
    """
    W = ids.shape[1]
    flat = ids.reshape(-1).long()
    flat_slot = torch.nonzero(flat >= 0).squeeze(-1)  # [P]
    experts = flat[flat_slot]
    if experts.numel() and int(experts.max()) >= num_experts:
        raise ValueError(f"expert id {int(experts.max())} out of range for {num_experts} experts")
    order = torch.sort(experts, stable=True).indices
    flat_slot = flat_slot[order]
    counts = torch.bincount(experts, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    return ExpertPairs(flat_slot=flat_slot, token=flat_slot // W, offsets=offsets)


@dataclass(frozen=True, slots=True)
class TileSchedule:
    """GEMM row tiles over the active pairs, grouped by expert; fixed shapes, no host sync.

    Pairs are the flat slots of ids [T, W] sorted by expert (stable: slot
    order within an expert). Tile i covers rows row[i] : row[i] + rows[i] of
    the sorted pairs, all of expert expert[i]; tiles past num_tiles (a device
    scalar) are empty and return at once. Every shape depends on (T, W, E,
    BLOCK_M) only, so the schedule can be captured in a CUDA graph.

    Example, BLOCK_M = 2: ids = [[3, 0], [0, -1]] sorts to slots [1, 2, 0]
    (experts 0, 0, 3); expert 0 has one full tile, expert 3 one tile of one
    row: expert = [0, 3, ...], row = [0, 2, ...], rows = [2, 1, 0...],
    num_tiles = 2; the inactive slot 3 is in no tile.
    """

    flat_slot: torch.Tensor  # [T*W] int32, active slots sorted by expert first; entries past them unspecified
    # Entries past num_tiles: the reference writes expert E, rows 0; the Triton schedule leaves them unwritten.
    expert: torch.Tensor  # [max_tiles] int32
    row: torch.Tensor  # [max_tiles] int32, first sorted pair of the tile
    rows: torch.Tensor  # [max_tiles] int32, pairs in the tile
    num_tiles: torch.Tensor  # [] int32, tiles with work


def max_tiles(num_slots: int, num_experts: int, block_m: int) -> int:
    """The fixed tile grid: sum over experts of ceil(count / BLOCK_M) <= slots / BLOCK_M + E."""
    return (num_slots + block_m - 1) // block_m + num_experts


def tile_schedule(ids: torch.Tensor, num_experts: int, block_m: int) -> TileSchedule:
    """The tile schedule of ids [T, W] (-1 = inactive) in torch ops of fixed shapes.

    The reference for tile_schedule_triton; it sorts inactive slots after
    every expert. Counting is a scatter_add_ into an [E + 1] buffer, not
    torch.bincount, which reads its maximum back to the host on CUDA.
    """
    T, W = ids.shape
    E = num_experts
    dev = ids.device
    flat = ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < E), flat, E)  # inactive (and out-of-range) slots sort last
    flat_slot = torch.sort(key, stable=True).indices
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    pairs_start = torch.cumsum(counts, 0) - counts
    tile = torch.arange(max_tiles(T * W, E, block_m), device=dev)
    expert = torch.searchsorted(tiles_end, tile, right=True)  # E past the last tile
    e = expert.clamp(max=E - 1)
    nth = tile - (tiles_end[e] - tiles[e])  # tile's index within its expert
    live = expert < E
    row = torch.where(live, pairs_start[e] + nth * block_m, 0)
    rows = torch.where(live, torch.clamp(counts[e] - nth * block_m, max=block_m), 0)
    return TileSchedule(
        flat_slot=flat_slot.to(torch.int32),
        expert=expert.to(torch.int32),
        row=row.to(torch.int32),
        rows=rows.to(torch.int32),
        num_tiles=tiles_end[-1].to(torch.int32),
    )
