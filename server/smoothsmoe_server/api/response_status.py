"""POST /v1/responses: a response, its last output item and its last stream event agree on how it ended.

vLLM 0.32 marks a response cut by max_output_tokens (or the context) "incomplete", with
incomplete_details, but leaves the item being written when it was cut "completed", and ends
the stream with a "response.completed" event carrying that incomplete response. OpenAI's
answer, which clients branch on: that item is "incomplete" too (in the response and in its
response.output_item.done event), and the stream ends with "response.incomplete".
install() wraps the method that builds the final response (whole answers, and the end of
every stream) and the one that writes stream events as server-sent events (live streams,
background ones and their replay by GET /v1/responses/{id}?stream=true).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from openai.types.responses import ResponseIncompleteEvent as OpenAIResponseIncompleteEvent
from vllm.entrypoints.openai.responses import api_router
from vllm.entrypoints.openai.responses.protocol import ResponsesResponse
from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses

from smoothsmoe_server.api.wrapping import wrap


class ResponseIncompleteEvent(OpenAIResponseIncompleteEvent):
    response: ResponsesResponse  # vLLM's response, with its own fields, as its other events carry


def install() -> None:
    """Wrap the final response's builder and the responses stream writer (API server process)."""
    wrap(OpenAIServingResponses, "responses_full_generator", _final_response)
    wrap(api_router, "_convert_stream_to_sse_events", _stream_end)


def mark_cut_item(response: ResponsesResponse) -> None:
    """An incomplete response's last item was cut where the response was: it is incomplete too."""
    if response.status != "incomplete" or not response.output:
        return
    last = response.output[-1]
    if getattr(last, "status", None) == "completed":
        last.status = "incomplete"


def _final_response(build):
    async def final(self, *args, **kwargs):
        response = await build(self, *args, **kwargs)
        if isinstance(response, ResponsesResponse):
            mark_cut_item(response)
        return response

    return final


def _stream_end(write):
    def written(generator):
        return write(_ended(generator))

    return written


async def _ended(events: AsyncIterator) -> AsyncIterator:
    """vLLM's events, with the last item's done event and the final event told how the response ended.

    The last item's done event comes right before the final event; it is held until then
    (an item's done event is otherwise passed on when the next event arrives).
    """
    held = None
    async for event in events:
        final = getattr(event, "type", None) == "response.completed"
        if held is not None:
            if final and event.response.status == "incomplete" and event.response.output \
                    and held.item.id == event.response.output[-1].id:
                held.item.status = event.response.output[-1].status
            yield held
            held = None
        if getattr(event, "type", None) == "response.output_item.done":
            held = event
            continue
        if final and event.response.status == "incomplete":
            event = ResponseIncompleteEvent(type="response.incomplete", sequence_number=event.sequence_number,
                                            response=event.response)
        yield event
    if held is not None:
        yield held
