"""ASGI middleware of the API server, listed by dotted name in vLLM's --middleware (cli.py).

vLLM builds each from its name with no arguments, innermost first:
  - MetricsRefresh: on GET /metrics, read the workers' routing counters first;
  - KeyedMetrics (--metrics-require-api-key): the API key on /metrics and /smoothsmoe/* too;
  - AbortedAsError: a generation the engine aborted (shutdown) is an error, not a 200;
  - OpenAIErrorBodies: every 4xx/5xx JSON body in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY
from starlette.datastructures import Headers
from vllm import envs
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from smoothsmoe_server.api.metrics import RoutingMetrics
from smoothsmoe_server.api.shutdown import shutting_down

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format


class MetricsRefresh:
    """ASGI middleware (listed in args.middleware): on GET /metrics, read the
    workers' routing counters first, so the scrape sees them as of its arrival.

    Reads run one at a time; scrapes that arrive while one runs wait for the next and share
    it. So a burst of scrapes costs at most two reads, and no scrape shows counters read
    before it arrived (a cache by age, kept earlier, showed counters up to its age old beside
    vLLM's own fresh token counters in the same scrape).
    """

    def __init__(self, app):
        self.app = app
        self.metrics = RoutingMetrics()
        self.lock = asyncio.Lock()
        self.read_started = -math.inf  # time.monotonic() at the start of the last read that succeeded
        # The registry vLLM's /metrics serves with a single API server (cli.py
        # refuses --api-server-count > 1, where it would be a multiprocess one).
        REGISTRY.register(self.metrics)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await self.refresh(scope["app"].state.engine_client)
        await self.app(scope, receive, send)

    async def refresh(self, engine) -> None:
        arrived = time.monotonic()
        async with self.lock:
            if self.read_started >= arrived:  # a read that began after this scrape arrived: share it
                return
            started = time.monotonic()
            try:
                self.metrics.update((await engine.collective_rpc("smoothsmoe_snapshot"))[0])
                self.read_started = started
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


ABORTED_MESSAGE = ("The server aborted this request before it finished: it is shutting down and was started with "
                   "--shutdown-timeout 0, which aborts in-flight requests (a positive value lets them finish).")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class AbortedAsError:
    """ASGI middleware (listed in args.middleware): a generation cut by a shutdown is an OpenAI error
    that says so.

    vLLM 0.32 ends a request its engine aborted (SIGTERM with --shutdown-timeout 0; api/shutdown.py
    makes every in-flight request end that way) with `finish_reason: "abort"`, a value the OpenAI
    API does not have, in a 200 that clients read as a normal short answer. Here it becomes a 503
    naming the shutdown: a streamed chunk becomes an error event ({"error": {...}}, which the openai
    client raises as an APIError) before `[DONE]`; a whole answer becomes a 503 error body. So does
    a 5xx while the server is shutting down (an engine that went first); at any other time a 5xx is
    a real failure and stays as vLLM reports it.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        held: dict = {}

        def cut(payload: bytes) -> bool:
            return _aborted(payload) or (_server_error(payload) and shutting_down())

        async def rewrite(message):
            if message["type"] == "http.response.start":
                if (message["status"] == 200 or message["status"] >= 500) and _is_json(message):
                    held["start"], held["body"] = message, b""  # wait for the answer: it may be cut
                    return
                return await send(message)
            if message["type"] != "http.response.body":
                return await send(message)
            if "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start, body = held.pop("start"), held.pop("body")
                if cut(body):
                    start, body = {**start, "status": 503}, _error_body()
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
            body = message.get("body", b"")
            if b'"abort"' in body or b'"error"' in body:  # a streamed event; vLLM sends each one whole
                body = b"\n\n".join(b"data: " + _error_body() if cut(event.removeprefix(b"data: ")) else event
                                    for event in body.split(b"\n\n"))
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, rewrite)


def _json(payload: bytes):
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _aborted(payload: bytes) -> bool:
    data = _json(payload) if b'"abort"' in payload else None
    choices = data.get("choices") if isinstance(data, dict) else None
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") == "abort"
                                             for c in choices)


def _server_error(payload: bytes) -> bool:
    data = _json(payload) if b'"error"' in payload else None
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and isinstance(error.get("code"), int) and error["code"] >= 500


def _error_body() -> bytes:
    return json.dumps({"error": {"message": ABORTED_MESSAGE, "type": "ServiceUnavailableError", "param": None,
                                 "code": 503}}).encode()
