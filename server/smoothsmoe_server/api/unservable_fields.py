"""Requests whose values this server cannot honour get a 400 naming the field, not a 200 that pretends.

vLLM 0.32 answers each of these 200 as if the value had been served (its request models
accept unknown fields and ignore them, OpenAIBaseModel's extra="allow"):
  - POST /detokenize with an id the tokenizer has no text for: the id is dropped from the
    text ([42, 99999, 1455] reads as [42, 1455]; [99999] as ""), where /v1/completions answers
    the same id 400;
  - POST /v1/completions with best_of other than n: vLLM's engine no longer ranks candidates,
    so n plain samples come back (OpenAI: best_of candidates, the n best returned);
  - POST /v1/chat/completions (and /batch) with the deprecated functions or function_call (the
    model never sees them), audio output (audio, modalities with "audio"), web_search_options,
    or best_of (the batch request even declares it);
  - POST /v1/responses with conversation (no conversation is stored or read) or, with no
    --tool-server, a built-in tool (web_search, file_search, code_interpreter, ...): only
    function tools reach the model.
Fields that do not change what is generated (user, metadata, store, prediction, service_tier)
stay accepted, as in vLLM.
"""

from __future__ import annotations

from vllm.entrypoints.openai.chat_completion.batch_serving import OpenAIServingChatBatch
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.exceptions import VLLMValidationError

from smoothsmoe_server.api.wrapping import check_first

# Chat fields of the OpenAI API that vLLM ignores although they change the answer: why each cannot be served.
CHAT_UNSERVED = {
    "functions": "the deprecated `functions` are not passed to the model here: give them as `tools`",
    "function_call": "the deprecated `function_call` is not supported here: use `tool_choice` with `tools`",
    "audio": "this server generates text only, no audio",
    "web_search_options": "this server has no web search",
}
FUNCTION_TOOL_TYPES = ("function", "namespace")  # the Responses tools vLLM renders for the model itself


def install() -> None:
    """Check each endpoint's request before vLLM handles it (API server process)."""
    check_first(ServingTokenization, "create_detokenize", check_detokenize)
    check_first(OpenAIServingCompletion, "create_completion", check_completion)
    check_first(OpenAIServingChat, "create_chat_completion", check_chat)
    check_first(OpenAIServingChatBatch, "create_batch_chat_completion", check_chat)
    check_first(OpenAIServingResponses, "create_responses", check_responses)


def check_detokenize(serving, request) -> None:
    """POST /detokenize: every id in `tokens` must have text, 0 <= id <= the tokenizer's largest id
    (pydantic already refuses negative ones). Raises VLLMValidationError (a 400) naming the first other."""
    tokenizer = serving.renderer.tokenizer
    if tokenizer is None:  # --skip-tokenizer-init: vLLM answers that itself
        return
    largest = tokenizer.max_token_id
    for i, token in enumerate(request.tokens):
        if token > largest:
            raise VLLMValidationError(f"tokens[{i}] = {token} is not a token id of this model's tokenizer "
                                      f"(ids 0..{largest}): it has no text to detokenize", parameter="tokens",
                                      value=token)


def check_completion(serving, request) -> None:
    """POST /v1/completions. Raises VLLMValidationError (a 400) for best_of other than n."""
    check_best_of(request)


def check_best_of(request) -> None:
    """best_of may only repeat n (OpenAI's default, 1): ranking candidates is not implemented.

    An extra field of CompletionRequest and ChatCompletionRequest, a declared one of
    BatchChatCompletionRequest; vLLM reads it in none of them.
    """
    best_of, n = getattr(request, "best_of", None), request.n or 1
    if best_of is not None and best_of != n:
        raise VLLMValidationError(f"best_of={best_of!r} is not supported: this server returns the n={n} sampled "
                                  "completions without generating and ranking extra candidates; drop best_of or "
                                  "set it to n", parameter="best_of", value=best_of)


def check_chat(serving, request) -> None:
    """POST /v1/chat/completions and /batch. Raises VLLMValidationError (a 400) naming the first field of
    CHAT_UNSERVED given, modalities other than ["text"], or best_of other than n."""
    check_best_of(request)
    extra = request.model_extra or {}
    for field, why in CHAT_UNSERVED.items():
        if extra.get(field) is not None:
            raise VLLMValidationError(f"{field} is not supported: {why}", parameter=field)
    modalities = extra.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise VLLMValidationError(f"modalities={modalities!r} is not supported: this server generates text only "
                                  '(["text"])', parameter="modalities", value=modalities)


def check_responses(serving, request) -> None:
    """POST /v1/responses. Raises VLLMValidationError (a 400) for conversation, and for a tool other than a
    function (or a namespace of them) when the server runs no tool server."""
    if (request.model_extra or {}).get("conversation") is not None:
        raise VLLMValidationError("conversation is not supported: this server stores no conversations; send the "
                                  "earlier turns in `input` or use previous_response_id", parameter="conversation")
    if serving.tool_server is not None:  # which built-in tools it runs is vLLM's business then
        return
    for i, tool in enumerate(request.tools):
        if tool.type not in FUNCTION_TOOL_TYPES:
            raise VLLMValidationError(f"tools[{i}] of type {tool.type!r} cannot be used: this server runs no "
                                      "built-in tools (no --tool-server); only function tools reach the model",
                                      parameter="tools", value=tool.type)
