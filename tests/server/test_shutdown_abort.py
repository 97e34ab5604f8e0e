"""SIGTERM with --shutdown-timeout 0: in-flight requests are aborted, and the client is told so.

vLLM 0.32 ends an aborted request with `finish_reason: "abort"` in a 200, which no OpenAI client
treats as an error; the server's AbortedAsError middleware turns it into an OpenAI error (503)
that names the shutdown, in a stream and in a whole answer. (Draining, the default, is tested in
test_reliability.py.)
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import openai
import pytest
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from loadtests.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_env):
    argv = [sys.executable, "-m", "smoothsmoe_server", "serve", "--shutdown-timeout", "0", "--enforce-eager"]
    s = ServerProcess("shutdown-abort", argv, server_env, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


def test_sigterm_with_shutdown_timeout_0_aborts_with_an_openai_error_naming_the_shutdown(server):
    outcome: dict[str, object] = {}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    request = dict(model=MODEL, prompt="Once upon a time", max_tokens=1500, extra_body={"ignore_eos": True})

    def stream():
        chunks = 0
        try:
            for _ in client.completions.create(**request, stream=True):
                chunks += 1
            outcome["stream"] = f"ended normally after {chunks} chunks"
        except openai.APIError as e:
            outcome["stream"] = e

    def whole():
        try:
            outcome["whole"] = client.completions.create(**request).choices[0].finish_reason
        except openai.APIStatusError as e:
            outcome["whole"] = e

    threads = [threading.Thread(target=stream), threading.Thread(target=whole)]
    for t in threads:
        t.start()
    time.sleep(3)  # both are generating
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    for t in threads:
        t.join(timeout=30)
    assert code == 0, server.tail()
    streamed, answered = outcome.get("stream"), outcome.get("whole")
    assert isinstance(streamed, openai.APIError) and "shutting down" in streamed.message, (outcome, server.tail())
    assert isinstance(answered, openai.APIStatusError) and answered.status_code == 503, (outcome, server.tail())
    assert "shutting down" in answered.message and "--shutdown-timeout" in answered.message
