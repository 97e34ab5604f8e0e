"""A check vLLM 0.32's Responses API lacks: an output message given as `input` needs content.

vLLM turns each `input` item of POST /v1/responses into a chat message. For an
output message ({"type": "message", "role": "assistant", "content": [...]}) it
reads content[0] unchecked, so an empty `content` ends in an IndexError and a
500 (found by the schema fuzzing, tests/server/test_fuzz.py). `install()` wraps
that conversion so the request gets a 400 naming the field, the answer vLLM
gives other malformed items, and nothing else changes.
"""

from __future__ import annotations

import functools

from openai.types.responses import ResponseOutputMessage
from vllm.entrypoints.openai.responses import utils
from vllm.exceptions import VLLMValidationError

_MARK = "_smoothsmoe_checked"


def install() -> None:
    """Wrap vLLM's item-to-message conversion (once; in the API server process)."""
    convert = utils._construct_message_from_response_item
    if getattr(convert, _MARK, False):
        return

    @functools.wraps(convert)
    def checked(item, *args, **kwargs):
        if isinstance(item, ResponseOutputMessage) and not item.content:
            raise VLLMValidationError("an output message in `input` has an empty `content`: "
                                      "give it at least one output_text part", parameter="input")
        return convert(item, *args, **kwargs)

    setattr(checked, _MARK, True)
    utils._construct_message_from_response_item = checked
