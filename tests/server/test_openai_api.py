"""The live server on the default model, through the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from tests.server.conftest import API_KEY

PROMPTS = ["The morning was cold and", "Computer programs are", "In the old harbour town", "My favourite recipe"]


@pytest.fixture(scope="module")
def client(smooth_server):
    return openai.OpenAI(base_url=f"{smooth_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(smooth_server):
    with httpx.Client(base_url=smooth_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def test_models_lists_the_default_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_and_its_stream_agree(client):
    kw = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0.0)
    done = client.completions.create(**kw)
    assert done.choices[0].finish_reason in ("length", "stop") and done.choices[0].text
    assert 0 < done.usage.completion_tokens <= 12
    chunks = list(client.completions.create(**kw, stream=True))
    assert len(chunks) > 1  # really streamed
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text  # greedy: same text


def test_chat_and_its_stream_agree(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello, how are you?"}], max_tokens=10,
              temperature=0.0)
    done = client.chat.completions.create(**kw)
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == done.choices[0].message.content


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0.0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(v <= 0.0 for v in lp.token_logprobs) and all(len(t) >= 1 for t in lp.top_logprobs)


def test_concurrent_requests(smooth_server, client):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{smooth_server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as aclient:
            return await asyncio.gather(*(aclient.completions.create(model=MODEL, prompt=p, max_tokens=8,
                                                                     temperature=0.0) for p in PROMPTS * 2))

    results = asyncio.run(run())
    assert len(results) == 8 and all(r.choices[0].text for r in results)
    # Greedy: a prompt answers the same whatever runs beside it in the batch.
    alone = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0.0)
    assert results[2].choices[0].text == results[6].choices[0].text == alone.choices[0].text


BAD_REQUESTS = [
    # (name, path, raw body, expected status)
    ("malformed JSON", "/v1/completions", '{"model": "%s", "prompt": "hi", "max_tokens": 2' % MODEL, 400),
    ("unknown model", "/v1/completions", json.dumps({"model": "nope", "prompt": "hi", "max_tokens": 2}), 404),
    ("negative max_tokens", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -3}), 400),
    ("max_tokens of the wrong type", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}), 400),
    ("messages of the wrong type", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}), 400),
    ("prompt longer than the context", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "word " * 3000, "max_tokens": 2}), 400),
    ("invalid UTF-8", "/v1/completions",
     b'{"model": "' + MODEL.encode() + b'", "prompt": "hi \xff\xfe", "max_tokens": 2}', 400),
    ("n out of range", "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 0}), 400),
    ("n too large", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 100000}), 400),
    ("max_tokens beyond the context", "/v1/completions",
     json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 100000}), 400),
    ("a 50 MB body", "/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * (50 << 20), "max_tokens": 2}),
     400),
    # vLLM 0.32 answers this one 500 (an unchecked content[0]; found by the fuzzing): responses_input.py
    ("an output message without content", "/v1/responses",
     json.dumps({"model": MODEL, "input": [{"type": "message", "role": "assistant", "content": []}]}), 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http, name, path, body, status):
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "still there?", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2})])
@pytest.mark.parametrize("value", [False, 0, "json", [], [{}]])
def test_a_body_vllm_validators_crash_on_gets_a_400_naming_the_field(http, path, body, value):
    """vLLM 0.32's own validator crashes on these (AttributeError, a 500; found by the fuzzing): body_validation.py."""
    r = http.post(path, json={"model": MODEL, **body, "structured_outputs": value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "body.structured_outputs" and "structured_outputs" in error["message"], error
    # The same field, well formed, is still vLLM's to read.
    ok = http.post(path, json={"model": MODEL, **body, "structured_outputs": {"regex": "[ab]"}})
    assert ok.status_code == 200, ok.text


def test_an_assistant_refusal_in_responses_input_is_read_as_its_text(client):
    """vLLM 0.32 answered 500 here (it reads content[0].text; found by the fuzzing): responses_input.py."""
    def prompt_tokens(part: dict) -> int:
        said = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed", "content": [part]}
        reply = client.responses.create(model=MODEL, max_output_tokens=2, temperature=0.0, input=[
            {"role": "user", "content": "Tell me a secret."}, said, {"role": "user", "content": "Why not?"}])
        assert reply.status in ("completed", "incomplete") and reply.output_text is not None
        return reply.usage.input_tokens

    words = "No, I will not share that. " * 4
    refused = prompt_tokens({"type": "refusal", "refusal": words})
    assert refused == prompt_tokens({"type": "output_text", "text": words, "annotations": []})
    assert refused > prompt_tokens({"type": "output_text", "text": "No.", "annotations": []})


def test_api_key_is_required_on_v1_and_health_stays_open(smooth_server):
    assert httpx.get(f"{smooth_server.url}/v1/models").status_code == 401
    bad = httpx.get(f"{smooth_server.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    assert bad.json() == {"error": {"message": "Unauthorized", "type": "AuthenticationError", "param": None,
                                    "code": 401}}
    no_key = openai.OpenAI(base_url=f"{smooth_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert httpx.get(f"{smooth_server.url}/health").status_code == 200
    # By default /metrics stays open for Prometheus (--metrics-require-api-key: see test_fuzz.py).
    assert httpx.get(f"{smooth_server.url}/metrics").status_code == 200


def test_openapi_lists_the_routes(smooth_server):
    paths = httpx.get(f"{smooth_server.url}/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/smoothsmoe/probe"):
        assert path in paths
