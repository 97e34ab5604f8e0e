"""Fuzz the server's OpenAPI schema with schemathesis: no 5xx, and the server still serves.

A server of its own (smoothing on, with an API key that guards /metrics too,
a short context so that generated requests stay cheap) takes the whole
schema, in two runs:

- every operation but /v1/responses, with schemathesis' coverage phase
  (boundary values, missing and wrong-typed fields) and random fuzzing;
- /v1/responses with examples and fuzzing only: its request schema is so large
  that the coverage phase alone generates tens of thousands of cases.

/v1/systemone is left out of the fuzzing: vLLM answers it with 501 Not
Implemented for every model without a structured-decision strategy (ours
included), which is the documented answer, not a crash; a test below pins that.

The cases come from a fixed seed, so that CI runs the same ones on every machine and a
failure replays (`st replay`, or the seed) instead of passing or failing by chance. For a
long run, `FUZZ_MAX_EXAMPLES` raises the examples per operation and `FUZZ_SEED=random`
explores new cases each time (schemathesis prints the seed it drew); see README.md, Reliability.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from loadtests.server_process import ServerProcess

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MIN_CASES = 2000
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
SEED = os.environ.get("FUZZ_SEED", "20261201")  # "random": let schemathesis draw one


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_env):
    argv = [sys.executable, "-m", "smoothsmoe_server", "serve", "--api-key", KEY, "--max-model-len", "128",
            "--enforce-eager", "--metrics-require-api-key"]
    s = ServerProcess("fuzz", argv, server_env, tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


def schemathesis(url: str, tmp_path: Path, *args: str) -> tuple[int, str]:
    """Runs the schemathesis CLI (installed beside this Python); returns (generated cases, output)."""
    cli = Path(sys.executable).with_name("schemathesis")
    argv = [str(cli), "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
            "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60",
            "--max-examples", str(MAX_EXAMPLES), "--generation-database", "none", "--no-color", *args]
    if SEED != "random":
        argv += ["--seed", SEED]
    # cwd: schemathesis keeps state in ./.schemathesis; keep it out of the repository.
    run = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"schemathesis found failures:\n{out[-6000:]}"
    summary = re.search(r"(\d+) generated, (\d+) passed", out)
    assert summary, out[-3000:]
    generated, passed = map(int, summary.groups())
    assert generated == passed
    return generated, out


def test_fuzzing_the_schema_gets_no_5xx_and_the_server_keeps_serving(server, tmp_path):
    most, _ = schemathesis(server.url, tmp_path, "--exclude-path-regex", "^/v1/(responses|systemone)",
                           "--phases", "coverage,fuzzing")
    responses, _ = schemathesis(server.url, tmp_path, "--include-path-regex", "^/v1/responses",
                                "--phases", "examples,fuzzing")
    print(f"schemathesis: {most} + {responses} cases, no 5xx")
    assert most + responses >= MIN_CASES

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None
    # Nothing left running or queued from the fuzzed requests.
    metrics = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(gauge + "{")]
        assert values and sum(values) == 0, (gauge, values)


def test_the_structured_decision_endpoint_answers_501_with_an_openai_error(server):
    r = httpx.post(f"{server.url}/v1/systemone", headers=AUTH, timeout=30,
                   json={"model": MODEL, "state": "The sky is green.",
                         "questions": {"true": {"type": "boolean", "instructions": "Is the state true?"}}})
    assert r.status_code == 501, r.text
    error = r.json()["error"]
    assert error["code"] == 501 and "structured decision" in error["message"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_metrics_and_probe_need_the_key_when_asked_and_health_stays_open(server):
    for path in ("/metrics", "/smoothsmoe/probe?layer=0"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(f"{server.url}{path}", headers=headers, timeout=30)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == 401 and r.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(f"{server.url}{path}", headers=AUTH, timeout=60).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
