"""The room a prompt leaves in the model's context for output: errors about it name the prompt.

vLLM 0.32 derives a request's max_tokens from the context (get_max_tokens: the context less
the prompt, capped by the request and server limits) and validates that derived value, so
its errors blame a value the client never sent:
  - a prompt that fills the context (e.g. 2048 tokens of a 2048-token context, or kept at
    that length by truncate_prompt_tokens) gets "max_tokens must be at least 1, got 0", and
    with echo and max_tokens 0, "requested output tokens (at least 1)";
  - /v1/responses says such a prompt "exceeds" the context it fits exactly;
  - truncation to fit (truncate_prompt_tokens -1, /v1/responses truncation "auto") without
    max_tokens cuts the prompt to the whole context (vLLM reads max_output_tokens 0 as a
    pooling request's "no output"), and then fails the same way;
  - min_tokens above the derived limit: "min_tokens must be less than or equal to
    max_tokens=4", when the client sent no max_tokens, or another name for it.
install() rebinds get_max_tokens in the serving modules (each knows its prompt's field name),
makes truncation to fit keep one token of room, and words min_tokens errors by what was sent.
"""

from __future__ import annotations

import dataclasses

from vllm.entrypoints.openai.chat_completion import batch_serving as chat_batch_serving
from vllm.entrypoints.openai.chat_completion import serving as chat_serving
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion import serving as completion_serving
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses import serving as responses_serving
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.exceptions import VLLMValidationError

from smoothsmoe_server.api.wrapping import wrap

# Each serving module that calls get_max_tokens, and the field its requests carry the prompt in
# (/v1/messages is served by the chat module: its prompt is `messages` too).
PROMPT_FIELD = {completion_serving: "prompt", chat_serving: "messages", chat_batch_serving: "messages",
                responses_serving: "input"}


def install() -> None:
    """Rebind vLLM's functions that derive and check the room for output (API server process)."""
    for module, field in PROMPT_FIELD.items():
        wrap(module, "get_max_tokens", _room_checked(field))
    for request_class in (CompletionRequest, ChatCompletionRequest, ResponsesRequest):
        wrap(request_class, "build_tok_params", _truncation_leaves_room)
    for request_class in (CompletionRequest, ChatCompletionRequest):
        wrap(request_class, "to_sampling_params", _min_tokens_checked)
    wrap(responses_serving.OpenAIServingResponses, "_validate_generator_input", _responses_prompt_checked)


def no_room(prompt_tokens: int, max_model_len: int, field: str, truncate_prompt_tokens: int | None = None):
    """The 400 for a prompt of `prompt_tokens` (after truncation) that leaves no output token in the context."""
    if truncate_prompt_tokens not in (None, -1):
        return VLLMValidationError(
            f"truncate_prompt_tokens={truncate_prompt_tokens} keeps {prompt_tokens} prompt tokens, which fill this "
            f"model's context of {max_model_len} tokens and leave no room for output: keep at most "
            f"{max_model_len - 1}", parameter="truncate_prompt_tokens", value=truncate_prompt_tokens)
    return VLLMValidationError(
        f"The prompt ({field}) has {prompt_tokens} tokens, which fill this model's context of {max_model_len} "
        f"tokens and leave no room for output: shorten it to at most {max_model_len - 1} tokens",
        parameter=field, value=prompt_tokens)


def _room_checked(field: str):
    def make(get_max_tokens):
        def checked(max_model_len, max_tokens, input_length, default_sampling_params, override_max_tokens=None,
                    truncate_prompt_tokens=None):
            kept = input_length  # what get_max_tokens counts: the prompt as truncation leaves it
            if truncate_prompt_tokens is not None:
                kept = min(input_length, max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens)
            if kept >= max_model_len:
                raise no_room(kept, max_model_len, field, truncate_prompt_tokens)
            return get_max_tokens(max_model_len, max_tokens, input_length, default_sampling_params,
                                  override_max_tokens, truncate_prompt_tokens=truncate_prompt_tokens)

        return checked

    make.__qualname__ = f"_room_checked.{field}"
    return make


def _truncation_leaves_room(build):
    def build_tok_params(self, model_config):
        params = build(self, model_config)
        # A generation request truncated to fit keeps one token of room (vLLM keeps none when
        # max_output_tokens is 0, which it also uses for "no max_tokens given").
        if params.truncate_prompt_tokens is not None and params.max_output_tokens == 0:
            params = dataclasses.replace(params, max_output_tokens=1)
        return params

    return build_tok_params


def client_max_tokens(request) -> tuple[str, int | None]:
    """(field, value): the output limit a completions or chat request carries, as the client named it.

    Completions' max_tokens is 16 when not given (OpenAI's default; vLLM fills it in before
    validation, so a given 16 and a default one look the same); chat's is None then.
    """
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return "max_completion_tokens", request.max_completion_tokens
    return "max_tokens", request.max_tokens


def _min_tokens_checked(to_sampling_params):
    def checked(self, max_tokens, *args, **kwargs):
        if self.min_tokens > max_tokens:
            field, asked = client_max_tokens(self)
            if asked is not None and self.min_tokens > asked:
                raise VLLMValidationError(f"min_tokens={self.min_tokens} is more than {field}={asked}",
                                          parameter="min_tokens", value=self.min_tokens)
            raise VLLMValidationError(f"min_tokens={self.min_tokens} is more than the {max_tokens} output tokens "
                                      "that the prompt and this server's limits leave room for",
                                      parameter="min_tokens", value=self.min_tokens)
        return to_sampling_params(self, max_tokens, *args, **kwargs)

    return checked


def _responses_prompt_checked(validate):
    def checked(self, engine_input):
        prompt_tokens, max_model_len = self._extract_prompt_len(engine_input), self.model_config.max_model_len
        if prompt_tokens == max_model_len:  # vLLM: "exceeds"; longer ones it words right
            raise no_room(prompt_tokens, max_model_len, "input")
        return validate(self, engine_input)

    return checked
