"""The HTTP server: vLLM's own OpenAI app, plus smoothing's start-up and metrics.

Everything OpenAI-facing (chat templates, streaming, logprobs, error bodies,
--api-key) is vLLM's. We add two things around it:
  - start-up: calibrate eps on the built-in prompts (eps=auto), then zero the
    counters so that warm-up and calibration are not counted;
  - /metrics: refresh the routing counters from the workers before vLLM's
    handler renders the registry (MetricsRefresh, an ASGI middleware).
"""

from __future__ import annotations

import asyncio
import logging
import time
from argparse import Namespace

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import State
from vllm import SamplingParams
from vllm.v1.engine.exceptions import EngineDeadError

from smoothsmoe_server.api import corrections, shutdown
from smoothsmoe_server.engine.eps import EpsPlan, eps_log_line
from smoothsmoe_server.engine.snapshot import Snapshot, UncountedLayer
from smoothsmoe_server.models.calibration_prompts import CALIBRATION_PROMPTS
from smoothsmoe_server.options import SmoothingOptions

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format
EPS_LOG_INTERVAL_S = 1.0  # --smooth-eps-log: one line a second
ENDPOINT_PLUGIN = "smoothsmoe"  # our name in both vllm.general_plugins and vllm.endpoint_plugins (pyproject)


class SmoothsmoeEndpoints:
    """This project's `vllm.endpoint_plugins` entry (vLLM's EndpointPlugin protocol).

    vLLM loads it in the API server process only when VLLM_PLUGINS names it, which
    `smoothsmoe serve` does (cli.py); plain `vllm serve` in the same environment stays stock.
    """

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)  # MoE language models; a pooling-only server gets no routing routes

    def attach_router(self, app: FastAPI) -> None:
        """Called by vLLM's build_app after its own routers: add ours, and our corrections of vLLM's answers."""
        corrections.install()  # the OpenAI answers vLLM 0.32 gets wrong (api/corrections.py)
        app.include_router(routes)

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        """Called by vLLM's init_app_state before the server listens: calibrate (eps=auto), zero the
        counters, start the eps log. Raises what calibration raises: the server then does not start."""
        options = SmoothingOptions.from_env()
        if engine_client is None or options is None:  # vLLM's CPU-only render server: no engine to route
            return
        await prepare_routing(engine_client, options)
        shutdown.install(engine_client, asyncio.get_running_loop())
        if options.eps_log:
            # Kept on the state: a task nobody references may be collected mid-run.
            state.smoothsmoe_eps_log = asyncio.create_task(write_eps_log(engine_client, options.eps_log))
        logger.info("smoothsmoe: routing ready; vLLM starts serving")


async def write_eps_log(engine, path: str, interval_s: float = EPS_LOG_INTERVAL_S) -> None:
    """Append every smoothed layer's eps and counts to `path` each interval (--smooth-eps-log)."""
    with open(path, "a") as f:
        while True:
            try:
                snapshot = Snapshot.from_wire((await engine.collective_rpc("smoothsmoe_snapshot"))[0])
            except Exception:  # an engine going down: the log ends, serving is not its business
                logger.exception("smoothsmoe: eps log stopped")
                return
            f.write(eps_log_line(snapshot, time.time()))
            f.flush()
            await asyncio.sleep(interval_s)


routes = APIRouter()
PROBE_STEPS = [0.1, 0.01]  # sweep steps, as fractions of the layer's eps


@routes.get("/smoothsmoe/probe")
async def probe(request: Request, layer: int = 0, seed: int = Query(0, ge=0, lt=2**63)):
    """Continuity probe of one live MoE layer (see probe.py): the largest jump of
    the layer's output between neighbours of a sweep through a routing
    boundary, smoothed and stock, for steps of eps/10 and eps/100.

    404 for a layer the model does not have, 400 for one that is not smoothed or
    cannot be probed (both name the field "layer"), 400 naming "seed" for a seed
    outside [0, 2^63) (FastAPI's check, answered by vLLM's handler; a larger one
    would fail the RPC's encoding); 503 with a dead engine, 500 for any other
    failure, whose reason is logged.
    """
    engine = request.app.state.engine_client
    try:
        snapshot = Snapshot.from_wire((await engine.collective_rpc("smoothsmoe_snapshot"))[0])
        found = snapshot.layer(layer)
        if found is None:
            known = sorted(s.layer for s in (*snapshot.layers, *snapshot.uncounted))
            return _error(404, f"the model has no MoE layer {layer} (its MoE layers: {known})", "layer")
        if isinstance(found, UncountedLayer) or not found.smoothed:
            return _error(400, f"layer {layer} is not smoothed: {found.reason}", "layer")
        result = (await engine.collective_rpc("smoothsmoe_probe_layer", args=(layer, PROBE_STEPS, seed)))[0]
    except EngineDeadError as e:
        logger.error("smoothsmoe: probe of layer %d: the engine is dead (%s)", layer, e)
        return _error(503, f"the engine is not running: {e}", None)
    except Exception as e:  # the probe itself failed: the server's fault, not the request's
        logger.exception("smoothsmoe: probe of layer %d failed", layer)
        return _error(500, f"the probe of layer {layer} failed: {e}", None)
    if "refused" in result:  # the layer cannot be probed, for what it is (probe.ProbeRefused)
        return _error(400, result["refused"], "layer")
    return result


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    """An OpenAI-shaped error body (vLLM's own errors have this form)."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(
        status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


@routes.get("/smoothsmoe/eps")
async def eps_by_rank(request: Request):
    """Each smoothed layer's eps on every worker rank ({"ranks": [{layer: eps}, ...]}): with tensor or
    pipeline parallelism the ranks of a layer must route alike, so their eps must agree."""
    ranks = await request.app.state.engine_client.collective_rpc("smoothsmoe_eps")
    return {"ranks": [{str(k): v for k, v in sorted(r.items())} for r in ranks]}


async def prepare_routing(engine, options: SmoothingOptions, prompts: list[str] = CALIBRATION_PROMPTS) -> dict:
    """Calibrate eps if asked (eps=auto), then zero the counters. Returns the calibration per layer."""
    results: dict = {}
    if options.enabled and EpsPlan.parse(options.eps).auto:
        start = time.perf_counter()
        await engine.collective_rpc("smoothsmoe_start_recording")
        params = SamplingParams(max_tokens=1, temperature=0.0)
        # Token ids cut to the context: a short --max-model-len must not make a built-in prompt fail start-up.
        tokenizer, room = engine.get_tokenizer(), engine.model_config.max_model_len - 1
        # Stay within the server's own admission limit (--max-num-queued-reqs).
        limit = asyncio.Semaphore(engine.vllm_config.scheduler_config.max_num_queued_reqs or len(prompts))

        async def prefill(i: int, prompt: str) -> None:
            ids = {"prompt_token_ids": tokenizer.encode(prompt)[:room]}
            async with limit:
                async for _ in engine.generate(ids, params, request_id=f"smoothsmoe-calibration-{i}"):
                    pass

        await asyncio.gather(*(prefill(i, p) for i, p in enumerate(prompts)))
        results = (await engine.collective_rpc("smoothsmoe_calibrate", args=(options.budget,)))[0]
        # Every rank routes the same tokens, so every rank calibrates alike; setting rank 0's eps on
        # all of them makes it so whatever a rank saw (under tensor parallelism each rank must route
        # the same way, or the layer's shards would compute different experts).
        await engine.collective_rpc("smoothsmoe_set_eps", args=({k: r["eps"] for k, r in results.items()},))
        for layer, r in sorted(results.items()):
            logger.info("smoothsmoe: layer %s eps=%.6g (mean extras %.3f on %d tokens%s)", layer, r["eps"],
                        r["mean_extras"], r["tokens"], "" if r["reached"] else ", budget NOT reached")
        logger.info("smoothsmoe: calibrated %d layers to %.2f extras/token in %.1f s", len(results),
                    options.budget, time.perf_counter() - start)
    await engine.collective_rpc("smoothsmoe_reset")
    return results


