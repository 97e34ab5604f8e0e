"""The Triton tile schedule against the torch one (pairs.tile_schedule), on both of its paths."""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels.pairs import tile_schedule
from smoothsmoe_kernels.tile_schedule_triton import ONEHOT_ELEMENTS, tile_schedule_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (T, W, E, BLOCK_M): empty; one slot; the docstring's; odd sizes; E = 256 and 3; and enough
# slots for several chunks (E = 8: 1024 a chunk; E = 128: 64 a chunk), the three-launch path.
SHAPES = [(0, 4, 8, 16), (1, 2, 8, 16), (2, 2, 4, 2), (33, 6, 60, 16), (40, 10, 256, 64), (257, 3, 3, 128),
          (700, 4, 8, 64), (300, 10, 128, 16)]


def ids_for(T, W, E, kind, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, E, (T, W), generator=g, dtype=torch.int32)
    if kind == "inactive":
        ids[:] = -1
    elif kind == "one_expert":
        ids = torch.where(ids >= 0, E - 1, -1).to(torch.int32)
    elif kind == "out_of_range":  # ids >= E count as inactive, as -1 does
        ids[::3, 0] = E + 5
    return ids.to(DEV)


@pytest.mark.parametrize("T,W,E,block_m", SHAPES)
@pytest.mark.parametrize("kind", ["random", "inactive", "one_expert", "out_of_range"])
def test_schedule_matches_the_torch_one(T, W, E, block_m, kind):
    ids = ids_for(T, W, E, kind, seed=T + E)
    if T == 2 and kind == "random":
        ids = torch.tensor([[3, 0], [0, -1]], dtype=torch.int32, device=DEV)
    ref, out = tile_schedule(ids, E, block_m), tile_schedule_triton(ids, E, block_m)
    active = int(((ids >= 0) & (ids < E)).sum())
    assert torch.equal(out.flat_slot[:active], ref.flat_slot[:active])  # a stable sort by expert
    assert int(out.num_tiles) == int(ref.num_tiles)
    live = int(ref.num_tiles)  # tiles past num_tiles are not written (the experts kernels skip them)
    for name in ("expert", "row", "rows"):
        assert torch.equal(getattr(out, name)[:live], getattr(ref, name)[:live]), name
    if T == 2 and kind == "random":  # pairs.TileSchedule's worked example
        assert out.flat_slot[:3].tolist() == [1, 2, 0] and out.expert[:2].tolist() == [0, 3]


def test_both_paths_are_exercised():
    def chunks(T, W, E):
        e_pad = 1 << (E - 1).bit_length()
        return -(-T * W // max(16, min(1024, ONEHOT_ELEMENTS // e_pad)))
    assert chunks(*SHAPES[1][:3]) == 1 and chunks(*SHAPES[-1][:3]) > 1 and chunks(*SHAPES[-2][:3]) > 1
