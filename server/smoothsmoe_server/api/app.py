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
import json
import logging
import signal
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY
from starlette.datastructures import Headers
from vllm import SamplingParams, envs
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware
from vllm.v1.engine.exceptions import EngineDeadError

from smoothsmoe_server.api import responses_input
from smoothsmoe_server.api.metrics import RoutingMetrics
from smoothsmoe_server.engine.eps import EpsPlan, eps_log_line
from smoothsmoe_server.engine.snapshot import Snapshot, UncountedLayer
from smoothsmoe_server.models.calibration_prompts import CALIBRATION_PROMPTS
from smoothsmoe_server.options import SmoothingOptions

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format
SNAPSHOT_MAX_AGE_S = 0.25  # scrapes closer together than this share one worker read
GRACEFUL_SHUTDOWN_S = 10  # after SIGTERM, how long open connections may take to finish
EPS_LOG_INTERVAL_S = 1.0  # --smooth-eps-log: one line a second


async def run_server(args, options: SmoothingOptions) -> None:
    """Start the engine, prepare routing, serve until SIGTERM/SIGINT (vLLM's chain)."""

    def interrupt_start_up(*_):  # uvicorn installs its own handlers once serving
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt_start_up)
    responses_input.install()
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine:
        await prepare_routing(engine, options)
        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        app.include_router(routes)
        await init_app_state(engine, app.state, args, tasks)
        logger.info("smoothsmoe: serving on %s", listen_address)
        eps_log = asyncio.create_task(write_eps_log(engine, options.eps_log)) if options.eps_log else None
        try:
            shutdown = await serve_http(app, sock=sock, **uvicorn_options(args))
        finally:
            if eps_log is not None:
                eps_log.cancel()
    try:
        await shutdown  # after the engine context exits, as vLLM's run_server_worker does
    finally:
        sock.close()


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


def uvicorn_options(args) -> dict:
    """The options vLLM's own build_and_serve passes to serve_http."""
    options = dict(
        enable_ssl_refresh=args.enable_ssl_refresh, host=args.host, port=args.port,
        log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers, h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        # On SIGTERM vLLM aborts the engine, but a stream whose engine side was
        # killed can stay open, and uvicorn would wait for it forever (seen in
        # test_reliability under load): close what is left after a grace period.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        options["log_config"] = log_config
    return options


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


class MetricsRefresh:
    """ASGI middleware (listed in args.middleware): on GET /metrics, read the
    workers' routing counters first, so the scrape sees them as of now."""

    def __init__(self, app):
        self.app = app
        self.metrics = RoutingMetrics()
        self.read_at = 0.0
        # The registry vLLM's /metrics serves with a single API server (cli.py
        # refuses --api-server-count > 1, where it would be a multiprocess one).
        REGISTRY.register(self.metrics)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await self.refresh(scope["app"].state.engine_client)
        await self.app(scope, receive, send)

    async def refresh(self, engine) -> None:
        if time.monotonic() - self.read_at < SNAPSHOT_MAX_AGE_S:
            return
        try:
            self.metrics.update((await engine.collective_rpc("smoothsmoe_snapshot"))[0])
            self.read_at = time.monotonic()
        except Exception:  # an unreadable engine must not break vLLM's own metrics: keep the last snapshot
            logger.exception("smoothsmoe: could not read the routing counters; /metrics shows the last ones")


def api_keys(args) -> list[str]:
    """The keys vLLM's own authentication accepts (--api-key first, else VLLM_API_KEY)."""
    return [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]


class KeyedMetrics(AuthenticationMiddleware):
    """ASGI middleware (listed in args.middleware by cli.py with
    --metrics-require-api-key): /metrics and /smoothsmoe/* need the API key too.

    vLLM's own middleware guards /v1 (and a few other prefixes) only; this one
    reuses its token check for the paths vLLM leaves open. /health stays open
    for load balancers and probes. vLLM builds middleware from a dotted name
    with no arguments, so the keys are read from the app's args on first use.
    """

    GUARDED = ("/metrics", "/smoothsmoe/")

    def __init__(self, app):
        super().__init__(app, tokens=[])
        self.api_tokens = None

    async def __call__(self, scope, receive, send):
        if self.api_tokens is None and scope["type"] == "http":
            super().__init__(self.app, tokens=api_keys(scope["app"].state.args))
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if (scope["type"] == "http" and scope.get("method") != "OPTIONS" and path.startswith(self.GUARDED)
                and not self.verify_token(Headers(scope=scope))):
            body = {"error": {"message": "Unauthorized: this server requires its API key on " + path,
                              "type": "AuthenticationError", "param": None, "code": 401}}
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)


class OpenAIErrorBodies:
    """ASGI middleware (listed in args.middleware): gives every 4xx/5xx JSON body the
    OpenAI error shape.

    vLLM answers its own errors as {"error": {...}}, but some come from FastAPI
    itself, e.g. a body that is not UTF-8 gets {"detail": "There was an error
    parsing the body"}. Those are rewritten to {"error": {"message", "type",
    "param", "code"}}; everything else passes through untouched (and streams).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def rewrite(message):
            if message["type"] == "http.response.start" and message["status"] >= 400 and _is_json(message):
                held["start"] = message  # wait for the body: it may need rewriting
                held["body"] = b""
                return
            if "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                body = _openai_error(held.pop("body"), start["status"])
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        await self.app(scope, receive, rewrite)


def _is_json(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in start["headers"])


def _openai_error(body: bytes, status: int) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    if isinstance(data.get("error"), str):  # vLLM's 401: {"error": "Unauthorized"}
        detail = data["error"]
    elif "error" in data or "detail" not in data:
        return body
    else:
        detail = data["detail"]
    message = detail if isinstance(detail, str) else json.dumps(detail)
    kind = {401: "AuthenticationError"}.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
