"""GapRecorder: the torch recording and the routing kernel's own keep the same rows."""

from __future__ import annotations

import pytest
import torch

from smoothsmoe_kernels import RoutingConfig
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing import route_with_gaps
from smoothsmoe_kernels.routing_triton import smooth_topk_triton
from tests.kernels.cases import adversarial_scores

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Steps of a calibration run: (T, every n-th row padding or None). Sizes off the kernel's
# 16-row blocks, a step of one row, and a step with no rows at all.
STEPS = [(37, 3), (1, None), (0, None), (50, None), (16, 2)]


def step_rows(config, T, pad_every, seed):
    scores = adversarial_scores(T, 24, seed=seed).to(DEV)
    valid = None if pad_every is None else torch.arange(T, device=DEV) % pad_every != pad_every - 1
    return scores, valid


def as_set(rows: torch.Tensor) -> list[tuple]:
    """Rows as a sorted list (the kernel's programs append in any order); +inf compares fine."""
    return sorted(tuple(r) for r in rows.cpu().tolist())


def record_both(config, capacity, steps=STEPS, recording=True):
    """The torch path (reference routing + GapRecorder.record) and the kernel's, over the same steps."""
    ref, ker = GapRecorder(config.max_extra, capacity, DEV), GapRecorder(config.max_extra, capacity, DEV)
    if recording:
        ref.start()
        ker.start()
    offered = []
    eps = torch.tensor(0.3, device=DEV)
    for i, (T, pad_every) in enumerate(steps):
        scores, valid = step_rows(config, T, pad_every, seed=i)
        _, gaps = route_with_gaps(scores, config, eps)
        ref.record(gaps, valid)
        smooth_topk_triton(scores, config, eps, valid=valid, recorder=ker)
        rows = torch.cat([gaps.gaps, gaps.cap_gap], dim=-1)
        offered.append(rows if valid is None else rows[valid])
    return ref, ker, torch.cat(offered)


@pytest.mark.parametrize("top_k,max_extra", [(2, 2), (4, 3), (1, 0)])
def test_kernel_records_the_rows_the_torch_path_records(top_k, max_extra):
    config = RoutingConfig(top_k=top_k, max_extra=max_extra)
    ref, ker, offered = record_both(config, capacity=1000)
    assert int(ker.recorded) == int(ref.recorded) == offered.shape[0]  # padding rows are not recorded
    r, k = ref.stop(), ker.stop()
    assert torch.equal(torch.cat([r.gaps, r.cap_gap], -1), offered)  # the torch path: in token order
    assert as_set(torch.cat([k.gaps, k.cap_gap], -1)) == as_set(offered)
    assert not bool(ker.recording)


def test_nothing_is_recorded_while_the_flag_is_off():
    config = RoutingConfig(top_k=2, max_extra=2)
    ref, ker, _ = record_both(config, capacity=1000, recording=False)
    assert int(ref.recorded) == int(ker.recorded) == 0
    assert not ker.rows.any() and not ref.rows[:-1].any()  # (the torch path's scratch row takes writes)


def test_past_the_capacity_the_steps_before_are_kept_whole_and_the_count_goes_on():
    config = RoutingConfig(top_k=2, max_extra=2)
    capacity = 40  # crossed in the fourth step, after 25 + 1 + 0 real rows
    ref, ker, offered = record_both(config, capacity)
    assert int(ker.recorded) == int(ref.recorded) == offered.shape[0] > capacity
    r, k = ref.stop(), ker.stop()
    assert torch.equal(torch.cat([r.gaps, r.cap_gap], -1), offered[:capacity])
    kept = as_set(torch.cat([k.gaps, k.cap_gap], -1))
    assert len(kept) == capacity
    first_steps = 25 + 1  # the steps before: kept whole
    remaining = as_set(offered)
    for row in as_set(offered[:first_steps]):
        assert row in kept
    for row in kept:  # the rest are rows that were offered, each at most as often
        remaining.remove(row)


def test_a_recorder_of_another_width_is_refused():
    config = RoutingConfig(top_k=2, max_extra=2)
    with pytest.raises(ValueError, match="does not fit"):
        smooth_topk_triton(torch.randn(4, 8, device=DEV), config, torch.tensor(0.1, device=DEV),
                           recorder=GapRecorder(1, 10, DEV))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_graph_records_only_while_the_flag_is_set():
    config = RoutingConfig(top_k=8, max_extra=2)
    scores, eps = torch.randn(64, 128, device="cuda"), torch.tensor(0.2, device="cuda")
    recorder = GapRecorder(2, 1000, "cuda")
    smooth_topk_triton(scores, config, eps, recorder=recorder)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        smooth_topk_triton(scores, config, eps, recorder=recorder)
    graph.replay()
    assert int(recorder.recorded) == 0
    recorder.start()
    graph.replay()
    graph.replay()
    got = recorder.stop()
    _, gaps = route_with_gaps(scores, config, eps)
    rows = torch.cat([gaps.gaps, gaps.cap_gap], -1)
    assert as_set(torch.cat([got.gaps, got.cap_gap], -1)) == as_set(torch.cat([rows, rows]))
