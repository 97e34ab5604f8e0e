"""--shutdown-timeout 0 (abort) made deterministic: in-flight requests end as aborted, not as a crash.

On SIGTERM, vLLM 0.32's launcher calls `engine_client.shutdown(timeout)` from a worker thread. With
timeout 0 its process manager sends the engine SIGTERM and, waiting 0 s, kills it at once; whether a
running request then ends with `finish_reason: "abort"`, with "EngineCore encountered an issue"
(a 500), or with its connection cut depends on which process gets there first. `install` wraps that
one call on the engine client this server was given: with timeout 0 it first aborts every request
through vLLM's public `pause_generation(mode="abort")` and waits (at most ABORT_FLUSH_S) until the
aborted outputs have reached their requests, then shuts down as vLLM would. The API server's
AbortedAsError middleware turns those aborts into errors that name the shutdown. A positive
timeout (drain, this project's default) is left to vLLM untouched.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format
ABORT_FLUSH_S = 5.0  # how long the aborted requests' last outputs may take to reach their streams
_state = {"shutting_down": False}


def shutting_down() -> bool:
    """Whether this API server has begun to shut down (SIGTERM or SIGINT reached vLLM's launcher)."""
    return _state["shutting_down"]


def install(engine_client, loop: asyncio.AbstractEventLoop) -> None:
    """Wrap `engine_client.shutdown` (vLLM's AsyncLLM) as the module docstring says; call once, from `loop`."""
    original = engine_client.shutdown

    @functools.wraps(original)
    def shutdown(timeout: float | None = None) -> None:
        _state["shutting_down"] = True
        if timeout == 0 and loop.is_running():
            try:
                abort = engine_client.pause_generation(mode="abort", clear_cache=False)
                asyncio.run_coroutine_threadsafe(abort, loop).result(ABORT_FLUSH_S)
                deadline = time.monotonic() + ABORT_FLUSH_S
                while engine_client.get_num_unfinished_requests() and time.monotonic() < deadline:
                    time.sleep(0.02)
            except Exception:  # the engine may already be gone: shut down regardless
                logger.exception("smoothsmoe: aborting in-flight requests before shutdown failed")
        original(timeout=timeout)

    engine_client.shutdown = shutdown
