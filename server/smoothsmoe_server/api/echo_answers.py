"""POST /v1/completions with `echo`: text, logprobs, token ids and usage describe the same tokens.

vLLM 0.32 (OpenAIServingCompletion) builds echo answers whose parts disagree:
  - with return_token_ids it echoes "" for the prompt, so `text` is the completion alone while
    `logprobs` list the prompt tokens too and their text_offsets point into the missing prompt;
  - with max_tokens 0 (score the prompt, generate nothing) its engine still samples one token
    (SamplingParams needs max_tokens >= 1): the text leaves it out, but usage.completion_tokens,
    `token_ids` and the stream's usage count it;
  - with truncate_prompt_tokens the text echoes the prompt as sent, while the model saw, and the
    logprobs and usage describe, only the tokens kept.
install() wraps the two methods that turn engine results into the answer (whole and streamed).
The results are corrected before vLLM reads them (the echoed prompt is the text of the tokens
the model saw; the sampled token of an echo-only request is dropped), vLLM builds the answer as
for return_token_ids off, and the token ids are put back where vLLM would have put them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.outputs import CompletionOutput, RequestOutput

from smoothsmoe_server.api.wrapping import wrap


def install() -> None:
    """Wrap the answer builders of /v1/completions (API server process)."""
    wrap(OpenAIServingCompletion, "request_output_to_completion_response", _whole_answer)
    wrap(OpenAIServingCompletion, "completion_stream_generator", _streamed_answer)


class Echo:
    """What one completion request's echo needs: built from the request (a CompletionRequest)."""

    def __init__(self, request, tokenizer):
        self.request = request
        self.tokenizer = tokenizer  # None with --skip-tokenizer-init: prompt text stays vLLM's
        self.on = bool(request.echo)
        self.only = self.on and request.max_tokens == 0  # score the prompt, return no generated token
        self.restores_ids = self.on and bool(request.return_token_ids)
        # vLLM echoes "" whenever return_token_ids is on: it builds the answer with it off.
        self.vllm_request = request.model_copy(update={"return_token_ids": False}) if self.restores_ids else request
        self.n = request.n or 1

    def correct(self, result: RequestOutput) -> None:
        """Make one engine result say what the answer must: the prompt the model saw, no sampled token."""
        if not self.on:
            return
        truncated = self.request.truncate_prompt_tokens is not None
        if (result.prompt is None or truncated) and result.prompt_token_ids is not None and self.tokenizer is not None:
            result.prompt = self.tokenizer.decode(result.prompt_token_ids)  # as vLLM detokenizes a prompt
        if self.only:
            for output in result.outputs:
                drop_sampled_token(output)

    def put_back_ids(self, response, results: list[RequestOutput]) -> None:
        """Set prompt_token_ids and token_ids on a whole answer's choices (one per prompt and n)."""
        outputs = [(result, output) for result in results for output in result.outputs]
        for choice, (result, output) in zip(response.choices, outputs, strict=True):
            choice.prompt_token_ids = list(result.prompt_token_ids)
            choice.token_ids = list(output.token_ids)


def drop_sampled_token(output: CompletionOutput) -> None:
    """Empty an echo-only output: the token its engine sampled is neither text, token id nor usage."""
    output.token_ids = []
    output.text = ""
    output.logprobs = [] if output.logprobs is not None else None
    output.cumulative_logprob = None


def _whole_answer(build):
    def whole(self, final_res_batch, request, *args, **kwargs):
        echo = Echo(request, self.renderer.tokenizer)
        for result in final_res_batch:
            echo.correct(result)
        response = build(self, final_res_batch, echo.vllm_request, *args, **kwargs)
        if echo.restores_ids:
            echo.put_back_ids(response, final_res_batch)
        return response

    return whole


def _streamed_answer(stream):
    def streamed(self, request, engine_inputs, result_generator, *args, **kwargs):
        echo = Echo(request, self.renderer.tokenizer)
        if not echo.on:
            return stream(self, request, engine_inputs, result_generator, *args, **kwargs)
        latest: dict[int, CompletionOutput] = {}  # choice index -> its output in the result being streamed
        results = _corrected(result_generator, echo, latest)
        events = stream(self, echo.vllm_request, engine_inputs, results, *args, **kwargs)
        return _with_ids(events, latest) if echo.restores_ids else events

    return streamed


async def _corrected(results: AsyncIterator, echo: Echo, latest: dict) -> AsyncIterator:
    async for prompt_idx, result in results:
        echo.correct(result)
        for output in result.outputs:  # vLLM's choice index: output.index + prompt_idx * n
            latest[output.index + prompt_idx * echo.n] = output
        yield prompt_idx, result


async def _with_ids(events: AsyncIterator[str], latest: dict) -> AsyncIterator[str]:
    """Add each chunk's token_ids (the tokens of its own text).

    vLLM yields a result's chunks before it reads the next result, so `latest` holds the
    output each chunk was made from. It already sends prompt_token_ids with the echoed prompt.
    """
    async for event in events:
        if not event.startswith("data: {"):
            yield event
            continue
        chunk = json.loads(event[len("data: "):])
        for choice in chunk.get("choices", []):
            choice["token_ids"] = list(latest[choice["index"]].token_ids)
        yield f"data: {json.dumps(chunk, ensure_ascii=False, separators=(',', ':'))}\n\n"
