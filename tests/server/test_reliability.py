"""Faults against a live server of its own (it is stopped by the last test):
a client that disconnects mid-stream, overload past the queue limit, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time

import httpx
import openai
import pytest
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from loadtests.metrics_scrape import metric_samples
from loadtests.server_process import ServerProcess

QUEUE_LIMIT = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_env):
    argv = [sys.executable, "-m", "smoothsmoe_server", "serve", "--max-num-queued-reqs", str(QUEUE_LIMIT),
            "--enforce-eager"]
    s = ServerProcess("reliability", argv, server_env, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


def gauge(url: str, name: str) -> float:
    return sum(s.value for s in metric_samples(url) if s.name == name)


def long_request(max_tokens: int = 1500) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}


def test_client_disconnect_aborts_the_request(server):
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=long_request()) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert gauge(server.url, "vllm:num_requests_running") == 1
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while gauge(server.url, "vllm:num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gauge(server.url, "vllm:num_requests_running") == 0  # aborted in the engine, not run to the end
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_overload_gets_a_fast_503_and_the_server_recovers(server):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one():
                start = time.monotonic()
                r = await client.post(f"{server.url}/v1/completions",
                                      json={**long_request(200), "stream": False})
                return r.status_code, time.monotonic() - start, r.json()

            return await asyncio.gather(*(one() for _ in range(4 * QUEUE_LIMIT)))

    results = asyncio.run(burst())
    rejected = [(t, body) for status, t, body in results if status == 503]
    served = [status for status, _, _ in results if status == 200]
    assert rejected and served and len(rejected) + len(served) == len(results)
    assert all(t < 5.0 for t, _ in rejected)  # rejected at admission, not after waiting
    assert all(body["error"]["code"] == 503 and body["error"]["message"] for _, body in rejected)
    assert gauge(server.url, "vllm:num_requests_running") == 0
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_zero(server):
    """`smoothsmoe serve` drains by default (--shutdown-timeout 60): a stream running when SIGTERM
    arrives is served to its end, with its finish_reason, and then the process exits 0."""
    outcome = {}
    max_tokens = 400

    def stream():
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        try:
            chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=max_tokens,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True}))
            outcome["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            outcome["tokens"] = chunks[-1].usage.completion_tokens
        except openai.APIError as e:
            outcome["error"] = repr(e)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(2)  # the request is generating
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=90)
    elapsed = time.monotonic() - start
    t.join(timeout=30)
    assert not t.is_alive()  # the client is not left hanging
    assert outcome.get("finish") == "length", (outcome, server.tail())
    assert outcome["tokens"] == max_tokens, outcome  # served to the end, not cut short
    assert code == 0 and elapsed < 60, (code, elapsed, server.tail())
    assert "mode=drain" in server.tail(400)
