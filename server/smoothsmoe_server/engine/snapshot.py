"""Snapshot: a worker's MoE layers as /metrics, the eps log and the commands read them.

Made in the engine worker (SmoothWorkerExtension.smoothsmoe_snapshot: one device-to-host
copy per layer) and sent to the API server through vLLM's collective_rpc, whose msgpack
encoding carries dicts, lists and numbers only. to_wire() gives that form, from_wire() reads
it back; readers use the fields, never the wire's keys.

Here in engine/ rather than beside StatsLayout in smoothsmoe_kernels/stats.py: a layer's
snapshot holds what only the server knows (whose experts compute it, why it stays stock, the
server's options); the kernels package, which knows nothing of a served model, keeps the
layout of the counts and their decoding (read_stats), which the snapshot uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from smoothsmoe_kernels import StatsLayout, read_stats
from smoothsmoe_kernels.stats import RoutingStats
from smoothsmoe_server.options import SmoothingOptions


@dataclass(frozen=True, slots=True)
class LayerSnapshot:
    """One counted MoE layer: its routing settings and its statistics buffer, as of one read."""

    layer: int  # the layer's index in the model
    smoothed: bool
    experts: str  # whose experts kernel computes the layer: "smoothsmoe" (active pairs) or "vllm"
    top_k: int
    max_extra: int  # 0 for a stock layer
    num_experts: int
    eps: float  # the band width, in score units (0 for a stock layer)
    eps_bounds: tuple[float, float] | None  # --smooth-eps online: (least, greatest) eps; None where eps is fixed
    margin_edges: tuple[float, ...]  # the margin histogram's bucket edges, in score units
    stats: tuple[float, ...]  # the buffer's values, [layout.size], laid out as StatsLayout says
    reason: str | None = None  # why the layer keeps stock routing (None when smoothed)

    @property
    def layout(self) -> StatsLayout:
        return StatsLayout(self.top_k, self.max_extra, self.num_experts, self.margin_edges)

    def counts(self) -> RoutingStats:
        """The buffer decoded (tokens, extras, hits, margin buckets, expert loads)."""
        return read_stats(torch.tensor(self.stats, dtype=torch.float64), self.layout)


@dataclass(frozen=True, slots=True)
class UncountedLayer:
    """A layer with neither router: stock routing vLLM's way, not counted (no family to count by)."""

    layer: int
    reason: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every MoE layer of one worker: counted ones with their counts, the others with their reason."""

    options: SmoothingOptions | None  # what the server was started with (None: no counted layer)
    layers: tuple[LayerSnapshot, ...] = ()
    uncounted: tuple[UncountedLayer, ...] = ()

    def layer(self, index: int) -> LayerSnapshot | UncountedLayer | None:
        """The layer with that index, counted or not; None if the model has no such MoE layer."""
        return next((s for s in (*self.layers, *self.uncounted) if s.layer == index), None)

    def to_wire(self) -> dict:
        """Plain dicts, lists and numbers: what collective_rpc can carry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, wire: dict | Snapshot) -> Snapshot:
        """The snapshot a worker sent (to_wire's form); a Snapshot is returned as it is (an engine in this
        process hands the object over unencoded). Raises KeyError or TypeError on anything else."""
        if isinstance(wire, Snapshot):
            return wire
        options = wire["options"]
        return cls(
            options=None if options is None else SmoothingOptions(**options),
            layers=tuple(LayerSnapshot(**{**s, "eps_bounds": None if s["eps_bounds"] is None else
                                          tuple(s["eps_bounds"]), "margin_edges": tuple(s["margin_edges"]),
                                          "stats": tuple(s["stats"])}) for s in wire["layers"]),
            uncounted=tuple(UncountedLayer(**u) for u in wire.get("uncounted", ())),
        )
