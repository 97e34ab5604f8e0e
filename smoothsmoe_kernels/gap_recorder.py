"""GapRecorder: a layer's band gaps kept on the device while the server calibrates.

Calibration (start-up `auto`, `smoothsmoe calibrate`, `smoothsmoe eval`) runs
prompts through the live engine, whose forward is already compiled and, on
CUDA, captured in graphs. So recording cannot be switched on by host code: it
is a device flag, and the forward appends the gaps of the real rows while the
flag is set. `record()` below does that with torch ops (the CPU path and the
reference). The Triton routing kernel does the same inside its launch
(smooth_topk_triton(..., recorder=)): a decode step then pays nothing for a
recorder that is off, where the torch ops cost about ten small kernels a layer
and step whether it is on or not.

Which rows are kept when more than `capacity` arrive: the torch path keeps the
first in token order. The kernel reserves each program's rows with one atomic,
so within the step that crosses the capacity, which of its rows are kept
depends on program order; every step before it is kept whole either way.
Calibration reads the rows as a set (a mean over tokens), so order does not matter.
"""

from __future__ import annotations

import torch

from smoothsmoe_kernels.routing_result import BandGaps


class GapRecorder:
    """Device buffers: up to `capacity` rows of (gap_1..gap_M, cap gap), a count, an on/off flag."""

    def __init__(self, max_extra: int, capacity: int, device: torch.device | str):
        self.max_extra = max_extra
        self.capacity = capacity
        # The last row is a scratch row: record() sends the rows it does not keep there.
        self.rows = torch.zeros(capacity + 1, max_extra + 1, dtype=torch.float32, device=device)
        self.recorded = torch.zeros((), dtype=torch.int64, device=device)  # rows offered, kept or not
        self.recording = torch.zeros((), dtype=torch.bool, device=device)

    def record(self, gaps: BandGaps, valid: torch.Tensor | None) -> None:
        """Append the real rows' gaps while the flag is set (device ops only, fixed shapes)."""
        self.record_rows(torch.cat([gaps.gaps, gaps.cap_gap], dim=-1), valid)

    def record_rows(self, rows: torch.Tensor, valid: torch.Tensor | None) -> None:
        """record() for the gaps as one [T, max_extra + 1] block: gap_1..gap_M, then the cap gap."""
        T = rows.shape[0]
        keep = self.recording.expand(T)
        if valid is None:  # every row is kept or none: row t goes to recorded + t (no scan)
            pos = self.recorded + torch.arange(T, device=keep.device)
        else:
            keep = keep & valid
            pos = self.recorded + torch.cumsum(keep, 0) - 1
        pos = torch.where(keep & (pos < self.capacity), pos, self.capacity)
        self.rows.index_copy_(0, pos, rows)
        self.recorded += keep.sum()

    def start(self) -> None:
        self.recorded.zero_()
        self.recording.fill_(True)

    def stop(self) -> BandGaps:
        """Switch off and return what was kept (a host sync: calibration only, never in a forward)."""
        self.recording.fill_(False)
        n = min(int(self.recorded), self.capacity)
        M = self.max_extra
        return BandGaps(gaps=self.rows[:n, :M].clone(), cap_gap=self.rows[:n, M:].clone())
