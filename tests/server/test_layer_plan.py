"""One LayerPlan per MoE layer, from an allow-list of FusedMoEFactory's arguments.

Layers are built in this process by vLLM's own factory, wrapped as the plugin wraps it, on the
CPU; the snapshot the worker would send is read by the Prometheus collector the API server
uses (a live server cannot be given a factory argument its model does not pass).
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from smoothsmoe_server.api.metrics import RoutingMetrics
from smoothsmoe_server.engine.eps import EpsPlan
from smoothsmoe_server.engine.experts_method import ActivePairsMoEMethod
from smoothsmoe_server.engine.layer_plan import (
    KNOWN_ARGUMENTS,
    PLAN_ATTRIBUTE,
    SMOOTHING_OFF,
    LayerPlan,
    argument_difference,
    plan_layer,
)
from smoothsmoe_server.engine.moe_patch import log_argument_difference, wrap
from smoothsmoe_server.engine.router import CountingRouter, SmoothRouter
from smoothsmoe_server.engine.worker_extension import model_snapshot
from smoothsmoe_server.options import SmoothingOptions
from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

from smoothsmoe_kernels import RoutingConfig

SIGNATURE = inspect.signature(FusedMoEFactory)
DEFAULTS = {name: p.default for name, p in SIGNATURE.parameters.items()}
# A small layer on this process's own parallel group of one (no torch.distributed set up).
LAYER = dict(num_experts=8, top_k=2, hidden_size=64, intermediate_size=64, tp_size=1, dp_size=1, pcp_size=1)


def args(**kw) -> dict:
    bound = SIGNATURE.bind(**{**LAYER, "prefix": "model.layers.0.mlp.experts", **kw})
    bound.apply_defaults()
    return dict(bound.arguments)


@pytest.fixture
def vllm_config():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):  # the factory reads it; a fresh one: layer names are registered
        yield


@pytest.fixture
def smoothsmoe_log(caplog):
    caplog.set_level(logging.INFO, logger="vllm.smoothsmoe")
    return caplog


def newer_factory():
    """FusedMoEFactory with one more keyword argument, as a newer vLLM's may have: it builds the same layer."""

    def factory(*a, moe_future_knob=None, **kw):
        return FusedMoEFactory(*a, **kw)

    knob = inspect.Parameter("moe_future_knob", inspect.Parameter.KEYWORD_ONLY, default=None)
    factory.__signature__ = SIGNATURE.replace(parameters=[*SIGNATURE.parameters.values(), knob])
    return factory


def test_the_plan_knows_every_argument_of_the_installed_factory():
    """vLLM 0.32's FusedMoEFactory: every parameter has a rule. A newer vLLM fails this until its new
    arguments are read and given one (meanwhile layers that pass them stay stock)."""
    assert argument_difference(SIGNATURE) == ([], [])
    assert {"routed_input_transform", "swiglu_alpha", "runner_cls"} <= KNOWN_ARGUMENTS


def test_a_layer_given_an_argument_the_plan_does_not_know_stays_stock(vllm_config, smoothsmoe_log):
    factory = newer_factory()
    log_argument_difference(inspect.signature(factory))
    assert any(r.levelno == logging.WARNING and "does not know: moe_future_knob" in r.getMessage()
               for r in smoothsmoe_log.records)
    build = wrap(factory, SmoothingOptions(eps="0.3"), EpsPlan.parse("0.3"))
    unknown = build(**LAYER, prefix="model.layers.0.mlp.experts", moe_future_knob=1.5)
    default = build(**LAYER, prefix="model.layers.1.mlp.experts", moe_future_knob=None)  # its default: known
    plain = build(**LAYER, prefix="model.layers.2.mlp.experts")

    assert isinstance(unknown.router, CountingRouter)  # vLLM's router, counted
    plan = getattr(unknown, PLAN_ATTRIBUTE)
    assert not plan.smoothed and "moe_future_knob" in plan.reason and "not known" in plan.reason
    assert unknown.router.top_k == 2  # built at the model's top_k, not widened
    stock_lines = [r.getMessage() for r in smoothsmoe_log.records if "keeps stock top-k routing" in r.getMessage()]
    assert len(stock_lines) == 1
    assert "model.layers.0.mlp.experts" in stock_lines[0] and "moe_future_knob" in stock_lines[0]
    for runner in (default, plain):
        assert isinstance(runner.router, SmoothRouter) and runner.router.top_k == 4  # width k + max_extra

    snapshot = model_snapshot(torch.nn.ModuleList([unknown, default, plain]).modules())
    assert snapshot.layers[0].reason == plan.reason
    metrics = RoutingMetrics()
    metrics.update(snapshot.to_wire())  # what the API server receives
    smoothed = next(f for f in metrics.collect() if f.name == "smoothsmoe_layer_smoothed")
    assert {s.labels["layer"]: s.value for s in smoothed.samples} == {"0": 0.0, "1": 1.0, "2": 1.0}


def test_what_each_argument_does_to_the_plan(vllm_config):
    options = SmoothingOptions(experts="smoothsmoe")
    plan = plan_layer(args(), DEFAULTS, options, "cpu")
    assert plan.smoothed and plan.experts == "smoothsmoe" and plan.config.width == 4 and plan.reason is None
    # Experts arguments: routing stays smoothed, vLLM's experts compute the layer, the plan says why.
    for kw, why in ((dict(swiglu_alpha=1.702), "SwiGLU alpha"), (dict(has_bias=True), "expert biases"),
                    (dict(activation="gelu"), "activation gelu"), (dict(intermediate_pad=64), "padded")):
        plan = plan_layer(args(**kw), DEFAULTS, options, "cpu")
        assert plan.smoothed and plan.experts == "vllm" and why in plan.experts_reason, kw
    # Neutral: a transform of the experts' input and output leaves routing and experts as they were.
    plan = plan_layer(args(routed_input_transform=torch.nn.Identity(), routed_output_transform=torch.nn.Identity()),
                      DEFAULTS, options, "cpu")
    assert plan.smoothed and plan.experts == "smoothsmoe"
    # A model-supplied runner runs the forward and may route by itself: stock, counted by the family.
    plan = plan_layer(args(runner_cls=object), DEFAULTS, options, "cpu")
    assert not plan.smoothed and "runner_cls" in plan.reason and plan.config.max_extra == 0
    # A model-supplied experts class (gpt-oss's loads its own weights): smoothed, with vLLM's experts.
    plan = plan_layer(args(routed_experts_cls=object), DEFAULTS, options, "cpu")
    assert plan.smoothed and plan.experts == "vllm" and "experts class" in plan.experts_reason
    # Smoothing off: every layer stock, with that reason; a layer that could not be smoothed keeps its own.
    off = SmoothingOptions(enabled=False)
    assert plan_layer(args(), DEFAULTS, off, "cpu").reason == SMOOTHING_OFF
    assert "hash routing" in plan_layer(args(hash_indices_table=torch.zeros(8, 2)), DEFAULTS, off, "cpu").reason
    # A name outside the allow-list: stock unless it has its default.
    extra = {**args(), "moe_future_knob": 3}
    assert "moe_future_knob" in plan_layer(extra, {**DEFAULTS, "moe_future_knob": None}, options, "cpu").reason
    assert plan_layer(extra, {**DEFAULTS, "moe_future_knob": 3}, options, "cpu").smoothed


def test_the_experts_choice_is_made_when_the_router_is(vllm_config):
    """--smooth-experts smoothsmoe on the CPU: this project's experts and a router that hands them its ids,
    both fixed when built; the snapshot says so."""
    build = wrap(FusedMoEFactory, SmoothingOptions(eps="0.3", experts="smoothsmoe"), EpsPlan.parse("0.3"))
    runner = build(**LAYER, prefix="model.layers.0.mlp.experts")
    assert isinstance(runner.routed_experts.quant_method, ActivePairsMoEMethod)
    assert runner.router.experts == "smoothsmoe" and getattr(runner, PLAN_ATTRIBUTE).experts == "smoothsmoe"
    assert model_snapshot(runner.modules()).layers[0].experts == "smoothsmoe"


def test_a_plan_holds_together():
    config = RoutingConfig(top_k=2)
    with pytest.raises(ValueError, match="reason"):
        LayerPlan(prefix="p", layer_index=0, num_experts=8, config=config, smoothed=False)
    with pytest.raises(ValueError, match="max_extra 0"):
        LayerPlan(prefix="p", layer_index=0, num_experts=8, config=config, smoothed=False, reason="r")
    with pytest.raises(ValueError, match="no reason"):
        LayerPlan(prefix="p", layer_index=0, num_experts=8, config=config, smoothed=True, reason="r")
