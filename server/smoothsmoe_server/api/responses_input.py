"""Two holes in vLLM 0.32's reading of an output message given as `input` to POST /v1/responses.

vLLM turns each `input` item into a chat message. For an output message
({"type": "message", "role": "assistant", "content": [...]}) it reads
`content[0].text` unchecked, and both ways that fails were found by the schema
fuzzing (tests/server/test_fuzz.py) as a 500:

  - an empty `content`: an IndexError. It gets a 400 naming the field, the answer
    vLLM gives other malformed items.
  - a refusal first ({"type": "refusal", "refusal": "..."}, which the OpenAI schema
    allows there): an AttributeError, a refusal part has no `text`. The refusal is
    what the assistant said, so it is served as the assistant's text, as an
    output_text part would be.

`install()` wraps that conversion (once); every other item passes through unchanged.
"""

from __future__ import annotations

import functools

from openai.types.responses import ResponseOutputMessage, ResponseOutputRefusal, ResponseOutputText
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
        if isinstance(item, ResponseOutputMessage) and isinstance(item.content[0], ResponseOutputRefusal):
            # vLLM reads content[0].text: the refusal, given as that text, is what it reads.
            said = ResponseOutputText(type="output_text", text=item.content[0].refusal, annotations=[])
            item = item.model_copy(update={"content": [said, *item.content[1:]]})
        return convert(item, *args, **kwargs)

    setattr(checked, _MARK, True)
    utils._construct_message_from_response_item = checked
