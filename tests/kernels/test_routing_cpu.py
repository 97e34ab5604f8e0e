"""The fused CPU routing against the torch reference: same ids, counts and gaps, weights within 1e-6."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from smoothsmoe_kernels import RoutingConfig, StatsLayout, accumulate, route_and_count, smooth_topk
from smoothsmoe_kernels.gap_recorder import GapRecorder
from smoothsmoe_kernels.routing import route_with_gaps, stock_result
from smoothsmoe_kernels.routing_cpu import count_stock_cpu, smooth_topk_cpu
from tests.kernels.cases import FAMILIES as CASE_FAMILIES
from tests.kernels.cases import LAYER_FAMILIES as FAMILIES
from tests.kernels.cases import WEIGHT_ATOL, adversarial_scores, assert_matches, call, layer_cases, routing_case

SHAPES = [(0, 8), (1, 8), (33, 60), (130, 128), (40, 256), (7, 5)]  # (T, E); E = 5 < W + 1 for some families


CASES = layer_cases(SHAPES)


def layer_inputs(T, E, family, dtype=torch.float32):
    kw, bias_scale = FAMILIES[family]
    scores = adversarial_scores(T, E, seed=T * 131 + E).to(dtype)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(E)) * bias_scale if bias_scale else None
    return RoutingConfig(**kw), scores, bias


@pytest.mark.parametrize("T,E,family", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_and_counts_the_same(T, E, family, dtype):
    config, scores, bias = layer_inputs(T, E, family, dtype)
    eps = torch.tensor(0.3)
    layout = StatsLayout(config.top_k, config.max_extra, E)
    stats, ref_stats = layout.new_buffer(), layout.new_buffer()
    valid = torch.arange(T) % 4 != 3  # every 4th row is padding: not counted, not recorded
    recorder, ref_recorder = GapRecorder(config.max_extra, 64, "cpu"), GapRecorder(config.max_extra, 64, "cpu")
    recorder.start(), ref_recorder.start()
    out, out_gaps = smooth_topk_cpu(scores, config, eps, bias, stats=stats, valid=valid, recorder=recorder)
    ref, ref_gaps = route_with_gaps(scores, config, eps, bias)
    assert_matches(out, out_gaps, ref, ref_gaps, config.routed_scaling_factor)
    accumulate(ref_stats, layout, ref, valid)
    ref_recorder.record(ref_gaps, valid)
    # Integer counts in float64 are exact; the margin sum adds the same float32 values in another order.
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=0)
    assert torch.equal(recorder.rows, ref_recorder.rows) and torch.equal(recorder.recorded, ref_recorder.recorded)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing_case())
def test_matches_reference_on_random_cases(case):
    ref = call(*case)
    out = call(*case, backend="cpu")
    assert torch.equal(out.ids, ref.ids) and torch.equal(out.order, ref.order)
    assert torch.equal(out.capped, ref.capped) and torch.equal(out.margin, ref.margin)
    torch.testing.assert_close(out.weights, ref.weights, atol=WEIGHT_ATOL, rtol=0)


def test_auto_is_this_path_off_cuda_and_route_and_count_dispatches():
    scores, eps = adversarial_scores(20, 16, seed=4), torch.tensor(0.4)
    config = RoutingConfig(top_k=2, max_extra=2)
    fast, _ = smooth_topk_cpu(scores, config, eps)
    auto = smooth_topk(scores, 2, 0.4, 2)
    assert torch.equal(auto.ids, fast.ids) and torch.equal(auto.weights, fast.weights)
    layout = StatsLayout(2, 2, 16)
    counted = {b: layout.new_buffer() for b in ("auto", "torch")}
    for backend, stats in counted.items():
        route_and_count(scores, config, eps, stats=stats, backend=backend)
    torch.testing.assert_close(counted["auto"], counted["torch"], rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        smooth_topk(scores, 2, 0.4, 2, backend="fast")


@pytest.mark.parametrize("family", CASE_FAMILIES)
def test_batch_invariance(family):
    """Bit for bit: a token's routing does not depend on the batch around it (the spec's rule)."""
    torch.manual_seed(1)
    T, E = 600, 60
    logits = torch.randn(T, E)
    logits[::7, 5] = logits[::7, 9]  # ties inside the batch
    logits[3::11] = float("nan")
    groups = (6, 3)
    full = call(logits, 4, 2, 0.4, family, None, groups, backend="cpu")
    perm = torch.randperm(T)
    permuted = call(logits[perm], 4, 2, 0.4, family, None, groups, backend="cpu")
    assert torch.equal(permuted.ids, full.ids[perm]) and torch.equal(permuted.weights, full.weights[perm])
    # Every row alone: a float32 op whose vectorized body and scalar tail differ (pow, sigmoid) shows
    # here in about one row in 300 (seen with pow in the step).
    for t in range(T):
        alone = call(logits[t : t + 1], 4, 2, 0.4, family, None, groups, backend="cpu")
        assert torch.equal(alone.ids[0], full.ids[t]) and torch.equal(alone.weights[0], full.weights[t]), t


def test_one_graph_under_torch_compile():
    """Dynamo traces routing, counting and recording whole (fullgraph: a graph break raises), with T
    dynamic; eps and the recorder's flag are data: changing them neither recompiles nor is missed."""
    torch._dynamo.reset()
    config, _, bias = layer_inputs(1, 64, "sigmoid_bias")
    layout = StatsLayout(config.top_k, config.max_extra, 64)
    stats, ref_stats = layout.new_buffer(), layout.new_buffer()
    recorder = GapRecorder(config.max_extra, 256, "cpu")
    eps = torch.tensor(0.05)

    def step(scores, valid):
        return smooth_topk_cpu(scores, config, eps, bias, stats=stats, valid=valid, recorder=recorder)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="eager")
    with torch.compiler.set_stance("default"):
        compiled(adversarial_scores(9, 64, seed=0), torch.ones(9, dtype=torch.bool))  # trace once
    stats.zero_()
    with torch.compiler.set_stance("fail_on_recompile"):
        for i, T in enumerate((5, 33, 17)):
            eps.fill_(0.02 * (i + 1))
            if i == 1:
                recorder.start()
            scores, valid = adversarial_scores(T, 64, seed=T), torch.arange(T) % 3 != 0
            out, gaps = compiled(scores, valid)
            ref, ref_gaps = route_with_gaps(scores, config, eps, bias)
            assert_matches(out, gaps, ref, ref_gaps, config.routed_scaling_factor)
            accumulate(ref_stats, layout, ref, valid)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=0)
    assert int(recorder.recorded) == sum(int((torch.arange(T) % 3 != 0).sum()) for T in (33, 17))


def test_inductor_compiled_matches_reference():
    """What vLLM's CPU graph would run (its inductor backend, T dynamic): the same routing and counts."""
    torch._dynamo.reset()
    config, _, _ = layer_inputs(1, 16, "softmax_norm")
    config = RoutingConfig(top_k=4, max_extra=2)
    layout = StatsLayout(4, 2, 16)
    stats, ref_stats = layout.new_buffer(), layout.new_buffer()
    eps = torch.tensor(0.3)
    compiled = torch.compile(lambda s: smooth_topk_cpu(s, config, eps, stats=stats), fullgraph=True, dynamic=True)
    for T in (3, 40):
        scores = adversarial_scores(T, 16, seed=T).bfloat16()
        out, gaps = compiled(scores)
        ref, ref_gaps = route_with_gaps(scores, config, eps)
        assert_matches(out, gaps, ref, ref_gaps)
        accumulate(ref_stats, layout, ref)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family,E", [("softmax_norm", 16), ("sigmoid_bias", 64), ("softmax_norm", 5)])
def test_compiled_as_vllm_compiles_it(family, E):
    """What vLLM's CPU graph runs: inductor with vLLM's CPU options, the layer's sizes static and the
    token count unbacked (one graph for every T, as vLLM marks it): the same routing, counts, gaps and
    recorded rows as the reference, and batch-invariant bit for bit (a token alone and inside a batch,
    at its start, middle and tail)."""
    from smoothsmoe_kernels.bench_routing_cpu import VLLM_CPU_INDUCTOR

    torch._dynamo.reset()
    config, _, bias = layer_inputs(1, E, family)
    layout = StatsLayout(config.top_k, config.max_extra, E)
    stats, ref_stats = layout.new_buffer(), layout.new_buffer()
    recorder, ref_recorder = GapRecorder(config.max_extra, 256, "cpu"), GapRecorder(config.max_extra, 256, "cpu")
    recorder.start(), ref_recorder.start()
    eps = torch.tensor(0.3)

    def step(s, valid):
        return smooth_topk_cpu(s, config, eps, bias, stats=stats, valid=valid, recorder=recorder)

    compiled = torch.compile(step, fullgraph=True, options=VLLM_CPU_INDUCTOR)
    first = (adversarial_scores(8, E, seed=1).bfloat16(), torch.ones(8, dtype=torch.bool))
    for t in first:
        torch._dynamo.decorators.mark_unbacked(t, 0)
    compiled(*first)
    stats.zero_(), recorder.start()
    outs = {}
    with torch.compiler.set_stance("fail_on_recompile"):
        for T in (1, 3, 40):
            scores, valid = adversarial_scores(T, E, seed=T).bfloat16(), torch.arange(T) % 4 != 3
            out, gaps = compiled(scores, valid)
            ref, ref_gaps = route_with_gaps(scores, config, eps, bias)
            assert_matches(out, gaps, ref, ref_gaps, config.routed_scaling_factor)
            accumulate(ref_stats, layout, ref, valid)
            ref_recorder.record(ref_gaps, valid)
            outs[T] = (scores, out)
        scores, out = outs[40]  # 40 = 2 x 16 + 8: rows 32..39 are the vectorized loops' tail
        for t in (0, 17, 33, 39):
            alone, _ = compiled(scores[t : t + 1], torch.zeros(1, dtype=torch.bool))
            assert torch.equal(alone.ids[0], out.ids[t]) and torch.equal(alone.weights[0], out.weights[t]), t
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=0)
    assert torch.equal(recorder.rows, ref_recorder.rows) and torch.equal(recorder.recorded, ref_recorder.recorded)


def test_the_servers_cpu_step_with_online_eps_is_one_graph():
    """Route, count and the online eps controller's step (what a layer runs each step with
    --smooth-eps online) trace into one graph, and move eps as the same step run eagerly does."""
    from smoothsmoe_kernels.eps_control import EpsControl, EpsController

    torch._dynamo.reset()
    config, layout = RoutingConfig(top_k=4, max_extra=2), StatsLayout(4, 2, 16)

    def layer():
        eps, stats = torch.tensor(0.05), layout.new_buffer()
        controller = EpsController(EpsControl(budget=0.5, window=64), eps, stats)
        controller.arm()
        return eps, stats, controller

    eager_state, compiled_state = layer(), layer()

    def step(scores, eps, stats, controller):
        out, _ = smooth_topk_cpu(scores, config, eps, stats=stats)
        controller.step()
        return out.weights, out.ids

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="eager")
    for i in range(12):  # windows of 64 tokens close along the way: eps moves toward the budget
        scores = torch.randn(40, 16, generator=torch.Generator().manual_seed(i))
        a = step(scores, *eager_state)
        b = compiled(scores, *compiled_state)
        assert torch.equal(a[1], b[1])
        assert torch.equal(eager_state[0], compiled_state[0]) and torch.equal(eager_state[1], compiled_state[1])
    assert int(compiled_state[2].updates) >= 5 and float(compiled_state[0]) > 0.05  # eps rose toward the budget


@pytest.mark.parametrize("T,E,family", CASES)
def test_stock_counts_match_the_reference(T, E, family):
    """count_stock_cpu (a stock layer's counting traced into vLLM's CPU graph) adds what the reference adds."""
    kw, _ = FAMILIES[family]
    config = RoutingConfig(**{**kw, "max_extra": 0})
    _, scores, bias = layer_inputs(T, E, family)
    ids = stock_ids(scores, config, bias)
    layout = StatsLayout(config.top_k, 0, E)
    stats, ref_stats = layout.new_buffer(), layout.new_buffer()
    valid = torch.arange(T) % 3 != 2
    count_stock_cpu(scores, ids, config, stats, bias, valid)
    accumulate(ref_stats, layout, stock_result(scores, ids, config, bias), valid)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=0)
    if (T, E) != (33, 60):  # compiled once a family: a compile costs seconds
        return
    torch._dynamo.reset()  # each case is a new closure over the same code: a recompile each, past Dynamo's limit
    compiled = torch.compile(lambda s, i: count_stock_cpu(s, i, config, stats, bias), fullgraph=True, dynamic=True)
    stats.zero_(), ref_stats.zero_()
    compiled(scores, ids)
    accumulate(ref_stats, layout, stock_result(scores, ids, config, bias))
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=0)


def stock_ids(scores, config, bias):
    """[T, k] ids a stock router would choose: the reference at max_extra 0 (a valid top-k choice)."""
    return route_with_gaps(scores, config, 0.0, bias)[0].ids


@pytest.mark.parametrize("E", [3, 16, 64, 300])
def test_top_lower_index_is_a_stable_sort(E):
    """The float64 keys order float32 scores exactly, ties to the lower index, values back bit for bit:
    against a stable descending sort, on rows of neighbouring floats (one float32 step apart), signed
    zeros, subnormals, float max, -inf and many ties, eagerly and compiled as vLLM compiles."""
    from smoothsmoe_kernels.bench_routing_cpu import VLLM_CPU_INDUCTOR
    from smoothsmoe_kernels.routing_cpu import _top_lower_index

    g = torch.Generator().manual_seed(E)
    f = torch.finfo(torch.float32)
    specials = torch.tensor([0.0, -0.0, f.tiny, -f.tiny, 1e-45, -1e-45, f.max, -f.max, float("-inf"), 1.0, -1.0])
    base = torch.randn(E, generator=g)
    rows = [
        specials[torch.randint(len(specials), (E,), generator=g)],
        torch.nextafter(base, torch.full_like(base, float("inf"))).where(torch.rand(E, generator=g) < 0.5, base),
        torch.randint(-2, 3, (E,), generator=g).float() * 1e-40,  # subnormal ties
        torch.randn(E, generator=g) * 1e30,
        torch.full((E,), -f.max),
    ]
    z = torch.stack(rows + [torch.randn(E, generator=g).round() for _ in range(11)])  # [16, E], ties
    n = min(E, 11) + 2  # past E for E = 3
    ref_vals, ref_idx = (z + 0.0).sort(dim=-1, descending=True, stable=True)  # + 0.0: -0.0 as +0.0
    ref_vals = torch.where(ref_vals == 0, 0.0, ref_vals)
    compiled = torch.compile(_top_lower_index, fullgraph=True, options=VLLM_CPU_INDUCTOR)
    for vals, idx in (_top_lower_index(z, n), compiled(z, n)):
        k = min(n, E)
        assert torch.equal(idx[:, :k], ref_idx[:, :k]) and torch.equal(vals[:, :k], ref_vals[:, :k])
        assert torch.equal(vals[:, :k].signbit(), ref_vals[:, :k].signbit())  # +0.0, never -0.0
        assert (idx[:, k:] == -1).all() and (vals[:, k:] == float("-inf")).all()
