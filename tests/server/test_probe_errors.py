"""GET /smoothsmoe/probe's answers when the probe cannot run: whose fault, which field, what is logged.

The route runs in FastAPI here with a stand-in for vLLM's engine client: one that fails the way a
dead engine or a failing worker makes collective_rpc fail (EngineDeadError; a plain Exception
carrying the worker's message, as vLLM's core client raises it), which a live server cannot be
made to do on demand. Its snapshot comes from real routers. The live 404 and 400 (an unknown
layer, a stock layer) are in test_continuity.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from smoothsmoe_server.api.app import routes
from smoothsmoe_server.engine.layer_plan import LayerPlan
from smoothsmoe_server.engine.router import SmoothRouter
from smoothsmoe_server.engine.snapshot import Snapshot, UncountedLayer
from smoothsmoe_server.options import SmoothingOptions
from vllm.v1.engine.exceptions import EngineDeadError

from smoothsmoe_kernels import RoutingConfig


class EngineStandIn:
    """collective_rpc as vLLM's engine client has it: the snapshot of one smoothed layer (0) and one
    uncounted one (1); the probe answers `probe_answer`, or raises it if it is an exception."""

    def __init__(self, probe_answer):
        plan = LayerPlan(prefix="model.layers.0.mlp.experts", layer_index=0, num_experts=8,
                         config=RoutingConfig(top_k=2), smoothed=True)
        router = SmoothRouter(plan, 0.3, None, torch.device("cpu"), SmoothingOptions(eps="0.3"))
        self.snapshot = Snapshot(options=router.options, layers=(router.snapshot(),),
                                 uncounted=(UncountedLayer(1, "its routing function computes none of the families"),))
        self.probe_answer = probe_answer

    async def collective_rpc(self, method: str, args: tuple = ()):
        if method == "smoothsmoe_snapshot":
            return [self.snapshot.to_wire()]
        if isinstance(self.probe_answer, BaseException):
            raise self.probe_answer
        return [self.probe_answer]


def client(probe_answer) -> TestClient:
    app = FastAPI()
    app.include_router(routes)
    app.state.engine_client = EngineStandIn(probe_answer)
    return TestClient(app)


@pytest.fixture
def smoothsmoe_log(caplog):
    caplog.set_level(logging.INFO, logger="vllm.smoothsmoe")
    return caplog


def test_a_dead_engine_is_a_503_not_the_clients_fault(smoothsmoe_log):
    r = client(EngineDeadError()).get("/smoothsmoe/probe", params={"layer": 0})
    assert r.status_code == 503 and r.json()["error"]["param"] is None
    assert any("engine is dead" in rec.getMessage() for rec in smoothsmoe_log.records)


def test_a_failing_probe_is_a_500_with_its_reason_logged(smoothsmoe_log):
    r = client(Exception("worker: out of memory")).get("/smoothsmoe/probe", params={"layer": 0})
    error = r.json()["error"]
    assert r.status_code == 500 and error["type"] == "InternalServerError" and error["param"] is None
    assert "out of memory" in error["message"]
    logged = [rec for rec in smoothsmoe_log.records if "probe of layer 0 failed" in rec.getMessage()]
    assert len(logged) == 1 and "out of memory" in str(logged[0].exc_info[1])  # with its traceback


def test_client_errors_name_the_layer():
    probe = client({"refused": "layer 0 has eps 0: nothing to compare"})
    r = probe.get("/smoothsmoe/probe", params={"layer": 0})  # the worker's refusal (probe.ProbeRefused)
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "layer 0 has eps 0: nothing to compare", "type": "BadRequestError", "param": "layer", "code": 400}
    r = probe.get("/smoothsmoe/probe", params={"layer": 1})  # uncounted: not smoothed, with its reason
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "layer 1 is not smoothed: its routing function computes none of the families")
    r = probe.get("/smoothsmoe/probe", params={"layer": 7})
    assert r.status_code == 404 and r.json()["error"]["param"] == "layer" and "[0, 1]" in r.json()["error"]["message"]
