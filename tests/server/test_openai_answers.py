"""Answers vLLM 0.32 gets wrong while saying 200 (or with a 400 that blames a value the client never
sent), as server/smoothsmoe_server/api/corrections.py corrects them, on the live default server.

Three tables, one per kind of wrong answer (issue 23):
  REFUSED      a value the server cannot honour: 400 naming the field, not a 200 that pretends;
  AGREEING     text, logprobs (tokens and offsets), token ids, usage, statuses and finish reasons
               of one answer describe the same thing, whole and streamed;
  BLAMED       a 4xx names the field and value the client sent, never one vLLM derived.
After every row the server must still answer a plain request.
"""

from __future__ import annotations

import json

import httpx
import pytest
from smoothsmoe_server.models.default_model import DEFAULT_MODEL_NAME as MODEL

from tests.server.conftest import API_KEY

CONTEXT = 2048  # the default model's --max-model-len
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
FULL_PROMPT = [100] * CONTEXT  # token ids: a prompt that fills the context exactly
USER = [{"role": "user", "content": "Hello, how are you?"}]
LONG_TEXT = "word " * 2500  # more tokens than the context holds


@pytest.fixture(scope="module")
def http(smooth_server):
    with httpx.Client(base_url=smooth_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as c:
        yield c


def post(http, path: str, body: dict) -> tuple[int, dict | list]:
    """POST `body` (model added); a streamed answer comes back as its list of JSON events."""
    body = {"model": MODEL, **body}
    if not body.get("stream"):
        r = http.post(path, json=body)
        return r.status_code, r.json()
    events = []
    with http.stream("POST", path, json=body) as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                if kind is not None:  # /v1/responses names each event twice: the SSE event and its type
                    assert event["type"] == kind
                events.append(event)
        return r.status_code, events


def still_serving(http) -> None:
    status, answer = post(http, "/v1/completions", {"prompt": "still there?", "max_tokens": 2})
    assert status == 200 and answer["choices"][0]["text"] is not None


# ---- a value the server cannot honour: 400 naming the field -------------------------------------------------------

REFUSED = [
    # (name, path, body, the field the error names, text the message must hold: the value sent)
    ("detokenize an id past the vocabulary", "/detokenize", {"tokens": [42, 99999, 1455]}, "tokens", "99999"),
    ("detokenize only an id past the vocabulary", "/detokenize", {"tokens": [99999]}, "tokens", "99999"),
    ("completions best_of above n", "/v1/completions", {"prompt": "Hi", "best_of": 2, "max_tokens": 2}, "best_of",
     "best_of=2"),
    ("completions best_of below n", "/v1/completions",
     {"prompt": "Hi", "best_of": 1, "n": 2, "max_tokens": 2, "temperature": 1}, "best_of", "best_of=1"),
    ("chat best_of", "/v1/chat/completions", {"messages": USER, "best_of": 3, "max_tokens": 2}, "best_of", "best_of=3"),
    ("chat batch best_of (a field it declares)", "/v1/chat/completions/batch",
     {"messages": [USER], "best_of": 2, "max_tokens": 2}, "best_of", "best_of=2"),
    ("chat deprecated functions", "/v1/chat/completions",
     {"messages": USER, "max_tokens": 2, "functions": [{"name": "f", "parameters": {"type": "object"}}]},
     "functions", "tools"),
    ("chat deprecated function_call", "/v1/chat/completions", {"messages": USER, "max_tokens": 2,
                                                                "function_call": "auto"}, "function_call", "tool"),
    ("chat audio output", "/v1/chat/completions",
     {"messages": USER, "max_tokens": 2, "modalities": ["text", "audio"]}, "modalities", "audio"),
    ("chat audio parameters", "/v1/chat/completions",
     {"messages": USER, "max_tokens": 2, "audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio"),
    ("chat web search", "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "web_search_options": {}},
     "web_search_options", "web search"),
    ("responses conversation", "/v1/responses", {"input": "hi", "max_output_tokens": 2, "conversation": "conv_1"},
     "conversation", "conversation"),
    ("responses built-in tool without a tool server", "/v1/responses",
     {"input": "hi", "max_output_tokens": 2, "tools": [{"type": "web_search"}]}, "tools", "web_search"),
]

SERVED_AS_ASKED = [  # the same fields with values the server does honour: still 200
    ("detokenize ids in the vocabulary", "/detokenize", {"tokens": [42, 1455]}),
    ("completions best_of equal to n", "/v1/completions", {"prompt": "Hi", "best_of": 1, "max_tokens": 2}),
    ("chat text modality", "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "modalities": ["text"]}),
    ("responses function tool", "/v1/responses", {"input": "hi", "max_output_tokens": 2, "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]}),
]


@pytest.mark.parametrize("name,path,body,param,mentions", REFUSED, ids=[r[0] for r in REFUSED])
def test_values_the_server_cannot_honour_get_a_400_naming_the_field(http, name, path, body, param, mentions):
    status, answer = post(http, path, body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and mentions in answer["error"]["message"], answer
    still_serving(http)


@pytest.mark.parametrize("name,path,body", SERVED_AS_ASKED, ids=[r[0] for r in SERVED_AS_ASKED])
def test_values_the_server_honours_still_get_a_200(http, name, path, body):
    status, answer = post(http, path, body)
    assert status == 200, answer
    if path == "/detokenize":
        assert answer["prompt"] == "Hello"  # 42 and 1455: what [42, 99999, 1455] used to read as


# ---- one answer, one story: text, logprobs, token ids, usage, statuses ----------------------------------------------

def assemble(events: list[dict]) -> dict:
    """A streamed completion put together as a whole one: choices by index, usage from the last chunk."""
    choices: dict[int, dict] = {}
    usage = None
    for event in events:
        assert "error" not in event, event
        if event.get("usage") is not None:
            usage = event["usage"]  # the final chunk's (include_usage) is the last one
        for part in event["choices"]:
            choice = choices.setdefault(part["index"], {"index": part["index"], "text": "", "token_ids": None,
                                                        "prompt_token_ids": None, "logprobs": None,
                                                        "finish_reason": None})
            choice["text"] += part["text"]
            if part.get("token_ids") is not None:
                choice["token_ids"] = (choice["token_ids"] or []) + part["token_ids"]
            if part.get("prompt_token_ids") is not None:
                choice["prompt_token_ids"] = part["prompt_token_ids"]
            if part.get("logprobs"):
                merged = choice["logprobs"] or {"tokens": [], "text_offset": [], "token_logprobs": []}
                for key in merged:
                    merged[key] += part["logprobs"][key]
                choice["logprobs"] = merged
            if part["finish_reason"] is not None:
                assert choice["finish_reason"] is None, "two finish reasons for one choice"
                choice["finish_reason"] = part["finish_reason"]
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def echo_agrees(http, body: dict, answer: dict) -> None:
    """An echo answer's text is the prompt the model saw plus what it generated, and every other part agrees."""
    n, prompts = body.get("n", 1), body["prompt"] if isinstance(body["prompt"], list) and isinstance(
        body["prompt"][0], str) else [body["prompt"]]
    choices = answer["choices"]
    assert len(choices) == n * len(prompts)
    generated_total, prompt_total = 0, 0
    for choice in choices:
        assert choice["finish_reason"] in ("length", "stop"), choice
        ids, prompt_ids = choice["token_ids"], choice["prompt_token_ids"]
        if body.get("return_token_ids"):
            assert prompt_ids and ids is not None, choice
            seen = post(http, "/detokenize", {"tokens": prompt_ids})[1]["prompt"]  # the prompt the model saw
            generated = post(http, "/detokenize", {"tokens": ids})[1]["prompt"]
            assert choice["text"] == seen + generated, choice
            generated_total += len(ids)
            if choice["index"] % n == 0:
                prompt_total += len(prompt_ids)
        if body["max_tokens"] == 0:
            assert ids in (None, []), "an echo-only answer generated a token"
        logprobs = choice["logprobs"]
        if body.get("logprobs") is not None:
            tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
            assert "".join(tokens) == choice["text"]  # the logprobs describe exactly the returned text
            assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
            if ids is not None:
                assert len(tokens) == len(prompt_ids) + len(ids)
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if body["max_tokens"] == 0:
        assert usage["completion_tokens"] == 0
    if body.get("return_token_ids"):
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_total, generated_total)
    if not isinstance(body["prompt"], list) and body.get("truncate_prompt_tokens") is None:
        assert all(c["text"].startswith(body["prompt"]) for c in choices)


def responses_agree(http, body: dict, answer) -> None:
    """A response cut by max_output_tokens says so in its status, its last item and its last event."""
    if isinstance(answer, list):  # streamed: the final event carries the response
        final, done = answer[-1], [e for e in answer if e["type"] == "response.output_item.done"]
        assert final["type"] == "response.incomplete", [e["type"] for e in answer]
        assert done[-1]["item"]["status"] == "incomplete" and done[-1]["item"]["id"] == final["response"]["output"][
            -1]["id"]
        response = final["response"]
    else:
        response = answer
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][-1]["status"] == "incomplete", response["output"]
    assert response["usage"]["output_tokens"] == body["max_output_tokens"]


def usage_agrees(http, body: dict, answer) -> None:
    """Prompt and output token counts are what the request's own limits make them."""
    usage = answer["usage"]
    if "input_tokens" in usage:  # /v1/responses
        assert usage["input_tokens"] == CONTEXT - 1, usage
    else:
        assert usage["prompt_tokens"] == CONTEXT - 1 and usage["completion_tokens"] <= 1, usage


ECHO = {"temperature": 0, "echo": True}
AGREEING = [
    # (name, path, body, check): whole and streamed (stream_options include_usage and continuous usage)
    ("completions echo with token ids and logprobs", "/v1/completions",
     {**ECHO, "prompt": "The answer is", "max_tokens": 1, "logprobs": 5, "return_token_ids": True}, echo_agrees),
    ("completions echo-only max_tokens 0", "/v1/completions",
     {**ECHO, "prompt": "The capital of France is", "max_tokens": 0, "logprobs": 1}, echo_agrees),
    ("completions echo-only with token ids, n=2", "/v1/completions",
     {**ECHO, "prompt": "The capital", "max_tokens": 0, "logprobs": 0, "n": 2, "temperature": 1,
      "return_token_ids": True}, echo_agrees),
    ("completions echo of a truncated prompt", "/v1/completions",
     {**ECHO, "prompt": "The capital of France is Paris", "max_tokens": 1, "logprobs": 0, "truncate_prompt_tokens": 3,
      "return_token_ids": True}, echo_agrees),
    ("completions echo of token ids", "/v1/completions",
     {**ECHO, "prompt": [508, 268, 421, 281], "max_tokens": 2, "return_token_ids": True}, echo_agrees),
    ("completions echo of two prompts, n=2", "/v1/completions",
     {**ECHO, "prompt": ["The capital", "Hi"], "max_tokens": 2, "n": 2, "temperature": 1, "seed": 7,
      "return_token_ids": True}, echo_agrees),
    ("responses cut by max_output_tokens", "/v1/responses", {"input": "hi", "max_output_tokens": 3, "temperature": 0},
     responses_agree),
    # Truncation to fit without max_tokens: vLLM 0.32 kept the whole context and refused (400, blaming max_tokens).
    ("chat truncated to fit", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": LONG_TEXT}], "truncate_prompt_tokens": -1, "temperature": 0},
     usage_agrees),
    ("completions echo-only truncated to fit", "/v1/completions",
     {"prompt": LONG_TEXT, "truncate_prompt_tokens": -1, "echo": True, "max_tokens": 0}, usage_agrees),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name,path,body,check", AGREEING, ids=[r[0] for r in AGREEING])
def test_one_answer_tells_one_story(http, name, path, body, check, stream):
    if stream:
        body = {**body, "stream": True}
        if path != "/v1/responses":
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    status, answer = post(http, path, body)
    assert status == 200, answer
    if stream and path != "/v1/responses":
        for event in answer:  # continuous usage: no chunk counts a token the answer does not hold
            if event.get("usage") and body.get("max_tokens") == 0:
                assert event["usage"]["completion_tokens"] == 0, event
        answer = assemble(answer) if path == "/v1/completions" else answer
        if path == "/v1/chat/completions":
            answer = {"usage": answer[-1]["usage"]}
    check(http, body, answer)
    still_serving(http)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "The morning was cold and", "max_tokens": 6, "temperature": 0, "logprobs": 1}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 6, "temperature": 0}),
], ids=["completions", "chat"])
def test_a_stream_ends_as_its_whole_answer(http, path, body):
    """Greedy: the streamed text, finish reason and last chunk's usage equal the whole answer's."""
    whole = post(http, path, body)[1]
    events = post(http, path, {**body, "stream": True, "stream_options": {"include_usage": True}})[1]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {k: whole["usage"][k] for k in events[-1]["usage"]}
    if path == "/v1/completions":
        streamed = assemble(events)["choices"][0]
        assert (streamed["text"], streamed["finish_reason"]) == (whole["choices"][0]["text"],
                                                                 whole["choices"][0]["finish_reason"])
        assert streamed["logprobs"]["tokens"] == whole["choices"][0]["logprobs"]["tokens"]
    else:
        parts = [c for e in events for c in e["choices"]]
        assert "".join(c["delta"].get("content") or "" for c in parts) == whole["choices"][0]["message"]["content"]
        assert [c["finish_reason"] for c in parts if c["finish_reason"]] == [whole["choices"][0]["finish_reason"]]


# ---- a 4xx names what the client sent -----------------------------------------------------------------------------

def chat_content_of(http, tokens: int) -> str:
    """A user message whose chat prompt is `tokens` long (" word" is 2 tokens here, " a" one)."""
    def length(content: str) -> int:
        return post(http, "/tokenize", {"messages": [{"role": "user", "content": content}]})[1]["count"]

    words = (tokens - length("word")) // 2
    content = "word" + " word" * words
    content += " a" * (tokens - length(content))
    assert length(content) == tokens
    return content


BLAMED = [
    # (name, path, body: a callable of the http client where it needs the tokenizer, the field named, the value
    #  the message must give, what it must not name: the field or value vLLM derived)
    ("completions prompt that fills the context", "/v1/completions", {"prompt": FULL_PROMPT}, "prompt", "2048",
     "max_tokens"),
    ("completions prompt that fills the context, max_tokens given", "/v1/completions",
     {"prompt": FULL_PROMPT, "max_tokens": 5}, "prompt", "2048", "got 0"),
    ("completions echo-only prompt that fills the context", "/v1/completions",
     {"prompt": FULL_PROMPT, "echo": True, "max_tokens": 0}, "prompt", "2048", "at least 1"),
    ("completions truncate_prompt_tokens that fills the context", "/v1/completions",
     {"prompt": FULL_PROMPT + [100], "truncate_prompt_tokens": CONTEXT, "max_tokens": 5},
     "truncate_prompt_tokens", "truncate_prompt_tokens=2048", "got 0"),
    ("chat truncate_prompt_tokens that fills the context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": LONG_TEXT}], "truncate_prompt_tokens": CONTEXT},
     "truncate_prompt_tokens", "truncate_prompt_tokens=2048", "max_tokens"),
    ("chat prompt that fills the context", "/v1/chat/completions",
     lambda http: {"messages": [{"role": "user", "content": chat_content_of(http, CONTEXT)}]}, "messages", "2048",
     "max_tokens"),
    ("responses input that fills the context", "/v1/responses",
     lambda http: {"input": chat_content_of(http, CONTEXT)}, "input", "2048", "exceeds"),
    ("chat max_completion_tokens 0", "/v1/chat/completions", {"messages": USER, "max_completion_tokens": 0},
     "max_completion_tokens", "got 0", "max_tokens"),
    ("responses max_output_tokens 0", "/v1/responses", {"input": "hi", "max_output_tokens": 0}, "max_output_tokens",
     "got 0", "max_tokens"),
    ("completions logprobs -1", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "logprobs": -1}, "logprobs",
     "logprobs=-1", "Requested sample logprobs"),
    ("completions prompt_logprobs -1", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "prompt_logprobs": -1},
     "prompt_logprobs", "prompt_logprobs=-1", "Requested prompt logprobs"),
    ("chat top_logprobs over the limit", "/v1/chat/completions",
     {"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": MAX_LOGPROBS + 10}, "top_logprobs",
     "top_logprobs=30", "sample logprobs"),
    ("chat top_logprobs -1", "/v1/chat/completions",
     {"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": -1}, "top_logprobs", "top_logprobs=-1",
     "Requested sample logprobs"),
    ("responses top_logprobs over the limit", "/v1/responses",
     {"input": "hi", "max_output_tokens": 2, "top_logprobs": MAX_LOGPROBS + 10,
      "include": ["message.output_text.logprobs"]}, "top_logprobs", "top_logprobs=30", "sample logprobs"),
    ("completions min_tokens above the room the prompt leaves", "/v1/completions",
     {"prompt": FULL_PROMPT[:-4], "min_tokens": 10}, "min_tokens", "min_tokens=10", "max_tokens=4"),
    ("chat min_tokens above max_completion_tokens", "/v1/chat/completions",
     {"messages": USER, "max_completion_tokens": 3, "min_tokens": 5}, "min_tokens", "max_completion_tokens=3",
     "max_tokens="),
    # Anthropic's error body has no param: the message alone names the field.
    ("messages max_tokens beyond the context", "/v1/messages",
     {"messages": USER, "max_tokens": 100000}, None, "max_tokens=100000", "max_completion_tokens"),
]


@pytest.mark.parametrize("name,path,body,param,mentions,not_named", BLAMED, ids=[r[0] for r in BLAMED])
def test_a_4xx_names_what_the_client_sent(http, name, path, body, param, mentions, not_named):
    status, answer = post(http, path, body(http) if callable(body) else body)
    assert status == 400, answer
    error = answer["error"]
    if param is not None:
        assert error["param"] == param, error
    assert mentions in error["message"] and not_named not in error["message"], error
    still_serving(http)


@pytest.mark.parametrize("status,last_event,item_status", [("completed", "response.completed", "completed"),
                                                           ("incomplete", "response.incomplete", "incomplete")])
def test_a_responses_stream_ends_as_its_response(status, last_event, item_status):
    """The installed stream writer on vLLM's own event objects (no server: the model rarely stops by
    itself, so a response that completes is built here): a completed one passes unchanged."""
    import asyncio

    from openai.types.responses import ResponseOutputMessage, ResponseOutputText
    from smoothsmoe_server.api import response_status
    from vllm import SamplingParams
    from vllm.entrypoints.openai.responses import api_router
    from vllm.entrypoints.openai.responses.protocol import (
        ResponseCompletedEvent,
        ResponseOutputItemDoneEvent,
        ResponsesRequest,
        ResponsesResponse,
    )

    response_status.install()
    item = ResponseOutputMessage(id="msg_1", role="assistant", status="completed", type="message",
                                 content=[ResponseOutputText(text="x", type="output_text", annotations=[])])
    response = ResponsesResponse.from_request(ResponsesRequest(input="hi"), SamplingParams(max_tokens=3),
                                              model_name=MODEL, created_time=0, output=[item.model_copy()],
                                              status=status)
    response_status.mark_cut_item(response)  # what the wrapped responses_full_generator does

    async def events():
        yield ResponseOutputItemDoneEvent(type="response.output_item.done", item=item, output_index=0,
                                          sequence_number=0)
        yield ResponseCompletedEvent(type="response.completed", response=response, sequence_number=1)

    async def written():
        return [part async for part in api_router._convert_stream_to_sse_events(events())]

    sent = [dict(line.split(": ", 1) for line in part.strip().split("\n")) for part in asyncio.run(written())]
    assert [s["event"] for s in sent] == ["response.output_item.done", last_event]
    done, final = (json.loads(s["data"]) for s in sent)
    assert done["item"]["status"] == final["response"]["output"][-1]["status"] == item_status
    assert final["response"]["status"] == status and final["sequence_number"] == 1
