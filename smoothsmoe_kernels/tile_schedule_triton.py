"""_chunk_counts_kernel, _tile_offsets_kernel, _pair_scatter_kernel + tile_schedule_triton().

The experts kernel's tile schedule (pairs.TileSchedule) in three small
launches (one, _one_chunk_schedule_kernel, when every slot fits one chunk, as
in decode), the job vLLM's `moe_align_block_size` CUDA op does for its kernel.
The flat slots of ids [T, W] are cut into chunks of CHUNK slots:

  1. per chunk (one program each): active pairs of each expert in the chunk
  2. one program: a running sum over chunks gives each chunk's first rank
     within every expert; over experts, the first sorted pair of each expert,
     its tiles, and for every tile of the fixed grid its expert, first row
     and row count
  3. per chunk: each active slot goes to its place in the sorted order,
     pair_start[e] + chunk base[e] + its rank among the chunk's slots of e

The order equals a stable sort by expert (pairs.tile_schedule, the
reference), so results are deterministic; tiles past num_tiles are left
unwritten (the reference fills them with E and 0 rows). No host sync, no atomics, no
memset; every shape depends on (T, W, E, BLOCK_M) only: capturable in a CUDA
graph. Slots whose id is outside [0, E) are inactive.

Worked example, E = 4, CHUNK = 2, ids.view(-1) = [3, 0, 0, -1]:
  1. chunk 0 counts [1, 0, 0, 1], chunk 1 counts [1, 0, 0, 0]
  2. chunk bases [0, 0, 0, 0] and [1, 0, 0, 1]; counts [2, 0, 0, 1],
     pair_start [0, 2, 2, 2]
  3. slot 0 (expert 3) -> 2 + 0 + 0 = 2; slot 1 (expert 0) -> 0 + 0 + 0 = 0;
     slot 2 (expert 0) -> 0 + 1 + 0 = 1: flat_slot = [1, 2, 0, (unspecified)]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothsmoe_kernels.pairs import TileSchedule, max_tiles


@triton.jit
def _chunk_onehot(ids_ptr, chunk, P, E: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """[CHUNK, E_PAD] int32: 1 where slot (row) of this chunk is an active pair of expert (column)."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
    cols = tl.arange(0, E_PAD)
    return offs, e, ((e[:, None] == cols[None, :]) & (cols < E)[None, :]).to(tl.int32)


@triton.jit
def _chunk_counts_kernel(ids_ptr, counts_ptr, P, E: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program: the active pairs of each expert in chunk program_id(0)."""
    chunk = tl.program_id(0)
    _, _, onehot = _chunk_onehot(ids_ptr, chunk, P, E, E_PAD, CHUNK)
    tl.store(counts_ptr + chunk * E_PAD + tl.arange(0, E_PAD), tl.sum(onehot, axis=0))


@triton.jit
def _tile_table(
    counts, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, TILE_ROWS: tl.constexpr,
):
    """From the pairs per expert counts [E_PAD]: write the tile table; return each expert's first sorted pair."""
    cols = tl.arange(0, E_PAD)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, axis=0)
    tiles_first = tiles_end - tiles
    pair_start = tl.cumsum(counts, axis=0) - counts
    num_tiles = tl.sum(tiles, axis=0)
    tl.store(num_tiles_ptr, num_tiles)
    # Only the live tiles are written: the experts kernels return at once on a
    # tile >= num_tiles, and the grid (slots / BLOCK_M + E) is mostly dead in
    # decode, where a full pass cost a quarter of the layer at E = 128.
    for t0 in range(0, num_tiles, TILE_ROWS):
        t = t0 + tl.arange(0, TILE_ROWS)
        # A tile's expert is the number of experts whose tiles all come before it.
        e = tl.sum((tiles_end[None, :] <= t[:, None]).to(tl.int32), axis=1)
        pick = cols[None, :] == e[:, None]
        nth = t - tl.sum(tl.where(pick, tiles_first[None, :], 0), axis=1)
        start = tl.sum(tl.where(pick, pair_start[None, :], 0), axis=1)
        left = tl.sum(tl.where(pick, counts[None, :], 0), axis=1) - nth * BLOCK_M
        live = t < num_tiles
        tl.store(expert_ptr + t, e, mask=live)
        tl.store(row_ptr + t, start + nth * BLOCK_M, mask=live)
        tl.store(rows_ptr + t, tl.minimum(left, BLOCK_M), mask=live)
    return pair_start


@triton.jit
def _tile_offsets_kernel(
    counts_ptr, pair_start_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr, num_chunks,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_ROWS: tl.constexpr, TILE_ROWS: tl.constexpr,
):
    """The only program: chunk bases (in place of the chunk counts), expert offsets, the tile table."""
    cols = tl.arange(0, E_PAD)
    running = tl.zeros((E_PAD,), tl.int32)
    for c0 in range(0, num_chunks, CHUNK_ROWS):
        chunks = c0 + tl.arange(0, CHUNK_ROWS)
        ptrs = counts_ptr + chunks[:, None] * E_PAD + cols[None, :]
        ok = (chunks < num_chunks)[:, None]
        cnt = tl.load(ptrs, mask=ok, other=0)
        tl.store(ptrs, tl.cumsum(cnt, axis=0) - cnt + running[None, :], mask=ok)  # exclusive, per expert
        running += tl.sum(cnt, axis=0)
    pair_start = _tile_table(running, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr,
                             E, E_PAD, BLOCK_M, TILE_ROWS)
    tl.store(pair_start_ptr + cols, pair_start)


@triton.jit
def _one_chunk_schedule_kernel(
    ids_ptr, flat_slot_ptr, expert_ptr, row_ptr, rows_ptr, num_tiles_ptr, P,
    E: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, TILE_ROWS: tl.constexpr,
):
    """The only program, when all slots fit one chunk (decode): steps 1 to 3 in one launch."""
    offs, e, onehot = _chunk_onehot(ids_ptr, 0, P, E, E_PAD, CHUNK)
    pair_start = _tile_table(tl.sum(onehot, axis=0), expert_ptr, row_ptr, rows_ptr, num_tiles_ptr,
                             E, E_PAD, BLOCK_M, TILE_ROWS)
    _scatter(onehot, offs, e, pair_start, tl.zeros((E_PAD,), tl.int32), flat_slot_ptr, P, E, E_PAD)


@triton.jit
def _scatter(onehot, offs, e, pair_start, base, flat_slot_ptr, P, E: tl.constexpr, E_PAD: tl.constexpr):
    """Each active slot of a chunk to pair_start[e] + base[e] + its rank among the chunk's slots of e."""
    before = tl.cumsum(onehot, axis=0) - onehot  # same-expert slots earlier in the chunk
    rank = tl.sum(before * onehot, axis=1)
    start = tl.sum(onehot * (pair_start + base)[None, :], axis=1)  # 0 for inactive slots
    active = (e >= 0) & (e < E) & (offs < P)
    tl.store(flat_slot_ptr + start + rank, offs, mask=active)


@triton.jit
def _pair_scatter_kernel(
    ids_ptr, bases_ptr, pair_start_ptr, flat_slot_ptr, P,
    E: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """One program: the active slots of chunk program_id(0) to their sorted positions."""
    chunk = tl.program_id(0)
    offs, e, onehot = _chunk_onehot(ids_ptr, chunk, P, E, E_PAD, CHUNK)
    cols = tl.arange(0, E_PAD)
    base = tl.load(bases_ptr + chunk * E_PAD + cols)
    _scatter(onehot, offs, e, tl.load(pair_start_ptr + cols), base, flat_slot_ptr, P, E, E_PAD)


ONEHOT_ELEMENTS = 8192  # CHUNK x E_PAD per program: a register-sized one-hot


def tile_schedule_triton(ids: torch.Tensor, num_experts: int, block_m: int) -> TileSchedule:
    """pairs.tile_schedule in three Triton launches (one when every slot fits one chunk).

    ids [T, W] int32, contiguous.
    """
    T, W = ids.shape
    E = num_experts
    P = T * W
    E_PAD = triton.next_power_of_2(E)
    chunk = max(16, min(1024, ONEHOT_ELEMENTS // E_PAD))
    num_chunks = max(1, triton.cdiv(P, chunk))
    grid_tiles = max_tiles(P, E, block_m)
    # One int32 allocation: chunk counts (then bases) | pair_start | flat_slot | expert | row | rows | num_tiles
    n = [num_chunks * E_PAD, E_PAD, P, grid_tiles, grid_tiles, grid_tiles, 1]
    counts, pair_start, flat_slot, expert, row, rows, num_tiles = torch.empty(
        sum(n), dtype=torch.int32, device=ids.device).split(n)
    flat = ids.reshape(-1)
    tile_rows = max(16, ONEHOT_ELEMENTS // E_PAD // 2)
    if num_chunks == 1:  # decode-sized: one launch instead of three
        _one_chunk_schedule_kernel[(1,)](
            flat, flat_slot, expert, row, rows, num_tiles, P,
            E=E, E_PAD=E_PAD, CHUNK=chunk, BLOCK_M=block_m, TILE_ROWS=tile_rows,
        )
    else:
        _chunk_counts_kernel[(num_chunks,)](flat, counts, P, E=E, E_PAD=E_PAD, CHUNK=chunk)
        _tile_offsets_kernel[(1,)](
            counts, pair_start, expert, row, rows, num_tiles, num_chunks,
            E=E, E_PAD=E_PAD, BLOCK_M=block_m, CHUNK_ROWS=max(1, ONEHOT_ELEMENTS // E_PAD // 2),
            TILE_ROWS=tile_rows,
        )
        _pair_scatter_kernel[(num_chunks,)](flat, counts, pair_start, flat_slot, P, E=E, E_PAD=E_PAD, CHUNK=chunk)
    return TileSchedule(flat_slot=flat_slot, expert=expert, row=row, rows=rows, num_tiles=num_tiles.view(()))
