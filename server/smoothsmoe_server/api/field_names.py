"""A 400 about a limit names the field and the value the client sent, not vLLM's internal ones.

vLLM 0.32 maps each endpoint's fields onto one set of sampling parameters and validates
those, so its errors name the internal parameter and the value it derived:
  - /v1/chat/completions max_completion_tokens 0 and /v1/responses max_output_tokens 0:
    "max_tokens must be at least 1, got 0" (param max_tokens);
  - logprobs -1 ("all of them"; completions logprobs and prompt_logprobs, chat
    top_logprobs and prompt_logprobs, responses top_logprobs): "Requested sample logprobs of
    2048" (the vocabulary size it became), and chat and responses top_logprobs over the
    limit are reported as `logprobs`;
  - /v1/messages max_tokens beyond the context: "max_completion_tokens=... cannot be greater
    than max_model_len" (the chat field it is converted to).
install() checks these values first, on each endpoint's own request, and words the 400 by
the field sent; vLLM's limits (--max-logprobs, --max-model-len) are unchanged.
"""

from __future__ import annotations

from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.batch_serving import OpenAIServingChatBatch
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
from vllm.exceptions import VLLMValidationError

from smoothsmoe_server.api.wrapping import check_first


def install() -> None:
    """Check limits by the client's field names before vLLM maps them (API server process)."""
    check_first(OpenAIServingCompletion, "create_completion", check_completion)
    check_first(OpenAIServingChat, "create_chat_completion", check_chat)
    check_first(OpenAIServingChatBatch, "create_batch_chat_completion", check_chat)
    check_first(OpenAIServingResponses, "create_responses", check_responses)
    check_first(AnthropicServingMessages, "create_messages", check_messages)


def at_least_one(field: str, value: int | None) -> None:
    """Raises VLLMValidationError (a 400 naming `field`) for a given `value` below 1 (a token count)."""
    if value is not None and value < 1:
        raise VLLMValidationError(f"{field} must be at least 1, got {value}", parameter=field, value=value)


def within_logprobs_limit(serving, field: str, value: int | None) -> None:
    """`value` logprobs per position (-1: every token's) must not exceed --max-logprobs (-1: no limit).

    The same limit vLLM applies (SamplingParams._validate_logprobs), reported by the field sent.
    """
    limit = serving.model_config.max_logprobs
    if value is None or limit == -1:
        return
    vocab = serving.model_config.get_vocab_size()
    if value == -1 and vocab > limit:
        raise VLLMValidationError(f"{field}=-1 asks for the logprobs of all {vocab} tokens of the vocabulary; this "
                                  f"server returns at most {limit} per position (--max-logprobs)", parameter=field,
                                  value=value)
    if value > limit:
        raise VLLMValidationError(f"{field}={value} is more than the {limit} logprobs per position this server "
                                  "returns (--max-logprobs)", parameter=field, value=value)


def check_completion(serving, request) -> None:
    """POST /v1/completions: logprobs and prompt_logprobs within --max-logprobs, by their own names."""
    within_logprobs_limit(serving, "logprobs", request.logprobs)
    within_logprobs_limit(serving, "prompt_logprobs", request.prompt_logprobs)


def check_chat(serving, request) -> None:
    """POST /v1/chat/completions and /batch: max_completion_tokens >= 1; top_logprobs and prompt_logprobs
    within --max-logprobs."""
    at_least_one("max_completion_tokens", request.max_completion_tokens)
    if request.logprobs:  # top_logprobs counts only with logprobs on (vLLM's own validator says so)
        within_logprobs_limit(serving, "top_logprobs", request.top_logprobs)
    within_logprobs_limit(serving, "prompt_logprobs", getattr(request, "prompt_logprobs", None))  # not in /batch


def check_responses(serving, request) -> None:
    """POST /v1/responses: max_output_tokens >= 1; top_logprobs within --max-logprobs (asked with or without
    the include that returns them: either way it is a value the server would not honour)."""
    at_least_one("max_output_tokens", request.max_output_tokens)
    within_logprobs_limit(serving, "top_logprobs", request.top_logprobs)


def check_messages(serving, request) -> None:
    """POST /v1/messages: max_tokens (tokens) at most the context (--max-model-len), by Anthropic's name."""
    max_model_len = serving.model_config.max_model_len
    if request.max_tokens > max_model_len:
        raise VLLMValidationError(f"max_tokens={request.max_tokens} is more than this model's context of "
                                  f"{max_model_len} tokens", parameter="max_tokens", value=request.max_tokens)
