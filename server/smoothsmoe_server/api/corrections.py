"""The vLLM 0.32 answers this server corrects, installed together in the API server process.

Each module wraps the vLLM function where one kind of wrong answer is made, in front of
vLLM's own handlers (no copy of them); the README's reliability paragraph lists them.
"""

from __future__ import annotations

from smoothsmoe_server.api import (
    body_validation,
    context_room,
    echo_answers,
    field_names,
    response_status,
    responses_input,
    unservable_fields,
)


def install() -> None:
    """Install every correction (once; safe to call again)."""
    body_validation.install()  # a body vLLM's own validators crash on: a 400 naming the field, not a 500
    responses_input.install()  # responses: an output message given as input, empty or a refusal
    unservable_fields.install()  # a value the server cannot honour: 400 naming the field
    echo_answers.install()  # completions echo: text, logprobs, token ids and usage agree
    response_status.install()  # responses: the cut item, the response and the last event agree
    context_room.install()  # a prompt that leaves no room for output: the 400 names the prompt
    field_names.install()  # limits reported by the field and value the client sent
