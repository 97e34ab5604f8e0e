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
