"""Routing statistics: the layout of a layer's device counter buffer, and how to fill it.

One flat float64 buffer per layer, allocated once and updated in place
(`accumulate`), so counting needs no host sync and survives CUDA graphs;
float64 holds integer counts exactly up to 2**53. `routing_stats` decodes it.
Metrics and tests both count through `accumulate`, so they count the same way.

Layout (M = max_extra, B = len(margin_edges), E = experts):

    [0] tokens  [1] active  [2] extras  [3] capped  [4] margin sum
    [5 : 5+M]                 tokens of order 1..M (boundary hits by order)
    [5+M : 5+M+B+1]           margin histogram, non-cumulative: bucket i holds
                              edges[i-1] < margin <= edges[i]; the last is > edges[-1]
    next E                    tokens per expert, top-k slots
    next E                    tokens per expert, extra slots
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from smoothsmoe_kernels.routing_result import FMAX, RoutingResult

# Router margins z(k) - z(k+1) in score units: logit margins are ~0.01..5,
# sigmoid-score margins ~1e-4..0.1, so the edges span both on a 1-2-5 scale.
MARGIN_EDGES = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

_TOKENS, _ACTIVE, _EXTRAS, _CAPPED, _MARGIN_SUM = range(5)
_HEAD = 5
TOKENS_INDEX, EXTRAS_INDEX = _TOKENS, _EXTRAS  # what the online eps controller reads


@dataclass(frozen=True, slots=True)
class StatsLayout:
    """Where each count lives in a layer's stats buffer."""

    top_k: int
    max_extra: int
    num_experts: int
    margin_edges: tuple[float, ...] = MARGIN_EDGES

    @property
    def hits(self) -> slice:
        return slice(_HEAD, _HEAD + self.max_extra)

    @property
    def margin_buckets(self) -> slice:
        start = self.hits.stop
        return slice(start, start + len(self.margin_edges) + 1)

    @property
    def expert_topk(self) -> slice:
        start = self.margin_buckets.stop
        return slice(start, start + self.num_experts)

    @property
    def expert_extra(self) -> slice:
        start = self.expert_topk.stop
        return slice(start, start + self.num_experts)

    @property
    def size(self) -> int:
        return self.expert_extra.stop

    def new_buffer(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(self.size, dtype=torch.float64, device=device)

    def edges_on(self, device: torch.device | str) -> torch.Tensor:
        """margin_edges as a float32 tensor on `device`, made once per device.

        Building it from the tuple is a host-to-device copy, which a CUDA graph
        cannot capture: the first call (at layer build, or in the warm-up vLLM
        runs before capture) makes it, later calls reuse it.
        """
        return _edges_tensor(self.margin_edges, torch.device(device))


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """The counts of the metrics table in docs/routing.md, read off a stats buffer (host values)."""

    tokens: int
    active: int
    extras: int
    capped: int
    margin_sum: float  # over tokens with a (k+1)-th candidate
    hits_by_order: list[int]  # index i = order i+1
    margin_buckets: list[int]  # non-cumulative, len(margin_edges) + 1
    expert_tokens_topk: list[int]  # [E]
    expert_tokens_extra: list[int]  # [E]

    @property
    def mean_active(self) -> float:
        return self.active / self.tokens if self.tokens else 0.0

    @property
    def mean_extras(self) -> float:
        return self.extras / self.tokens if self.tokens else 0.0


def accumulate(
    buffer: torch.Tensor,
    layout: StatsLayout,
    result: RoutingResult,
    valid: torch.Tensor | None = None,
) -> None:
    """Add one routing step's counts into `buffer` in place, on its device.

    valid [T] bool, if given, marks the rows to count (padding rows are
    False); everything stays on the device, with no host sync.
    """
    T, W = result.ids.shape
    K = layout.top_k
    dev = buffer.device
    row = torch.ones(T, dtype=torch.float64, device=dev) if valid is None else valid.to(torch.float64)
    order = result.order.to(torch.float64)
    has_next = result.margin < FMAX  # no (k+1)-th candidate: +Inf bucket, not in the sum
    head = torch.stack(
        [
            row.sum(),
            (row * (K + order)).sum(),
            (row * order).sum(),
            (row * result.capped.to(torch.float64)).sum(),
            (row * torch.where(has_next, result.margin.double(), 0.0)).sum(),
        ]
    )
    buffer[:_HEAD] += head
    if layout.max_extra:
        # order 0 goes to a scratch slot that is dropped: one scatter, no branch.
        hits = torch.zeros(layout.max_extra + 1, dtype=torch.float64, device=dev)
        hits.index_add_(0, result.order.long(), row)
        buffer[layout.hits] += hits[1:]
    edges = layout.edges_on(dev)
    bucket = torch.bucketize(result.margin, edges)  # edges[i-1] < m <= edges[i]
    buffer[layout.margin_buckets].index_add_(0, bucket, row)
    ids = result.ids.long()
    slot_row = row.unsqueeze(-1).expand(T, W)
    topk_ids, extra_ids = ids[:, :K], ids[:, K:]
    buffer[layout.expert_topk].index_add_(0, topk_ids.reshape(-1), slot_row[:, :K].reshape(-1))
    extra_w = torch.where(extra_ids >= 0, slot_row[:, K:], 0.0)
    buffer[layout.expert_extra].index_add_(0, extra_ids.clamp(min=0).reshape(-1), extra_w.reshape(-1))


@lru_cache(maxsize=64)
def _edges_tensor(edges: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Constants only (a tuple of floats per device): read, never written.
    return torch.tensor(edges, dtype=torch.float32, device=device)


def read_stats(buffer: torch.Tensor, layout: StatsLayout) -> RoutingStats:
    """Decode a stats buffer (one device-to-host copy)."""
    b = buffer.detach().cpu()

    def ints(s: slice) -> list[int]:
        return [int(v) for v in b[s].tolist()]

    return RoutingStats(
        tokens=int(b[_TOKENS]),
        active=int(b[_ACTIVE]),
        extras=int(b[_EXTRAS]),
        capped=int(b[_CAPPED]),
        margin_sum=float(b[_MARGIN_SUM]),
        hits_by_order=ints(layout.hits),
        margin_buckets=ints(layout.margin_buckets),
        expert_tokens_topk=ints(layout.expert_topk),
        expert_tokens_extra=ints(layout.expert_extra),
    )


def routing_stats(result: RoutingResult, top_k: int, num_experts: int) -> RoutingStats:
    """The metrics counts (docs/routing.md) for one batch's routing result."""
    layout = StatsLayout(top_k=top_k, max_extra=result.ids.shape[1] - top_k, num_experts=num_experts)
    buffer = layout.new_buffer(result.ids.device)
    accumulate(buffer, layout, result)
    return read_stats(buffer, layout)
