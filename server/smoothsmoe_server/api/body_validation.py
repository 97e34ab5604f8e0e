"""A request body that crashes vLLM 0.32's own validators: a 400 naming the field, not a 500.

FastAPI validates each JSON body against vLLM's request model (pydantic). Some of those
models' `mode="before"` validators read the raw JSON before pydantic has checked its types,
so a value of the wrong type raises a plain Python error there, not a ValidationError, and
the client gets a 500: `"structured_outputs": false` (or any non-object) on
/v1/chat/completions and /v1/completions is an AttributeError in vLLM's
check_structured_outputs_count (found by the schema fuzzing, tests/server/test_fuzz.py).

Such an error, raised while the *body* is validated, is the client's malformed body.
`install()` wraps FastAPI's body validation so that it becomes the validation error FastAPI
reports as a 400 (vLLM's handler gives it the OpenAI error shape), with `param` naming the
first top-level field whose value its own declared type refuses (the value the validator read
unchecked), or the body when there is none. Only the errors a value of the wrong
shape raises are caught (AttributeError, TypeError, KeyError, IndexError); anything else
still reaches the server's 500 handler, and a well-formed body is validated exactly as before.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from fastapi.dependencies import utils as fastapi_dependencies
from pydantic import BaseModel, TypeAdapter, ValidationError

from smoothsmoe_server.api.wrapping import wrap

logger = logging.getLogger("vllm.smoothsmoe")  # under "vllm": vLLM's log handlers and format
WRONG_SHAPE = (AttributeError, TypeError, KeyError, IndexError)


def install() -> None:
    """Wrap FastAPI's validation of one request value (once; in the API server process).

    FastAPI's request_body_to_args looks `_validate_value_with_model_field` up in its module
    at call time, so rebinding the name there covers every route.
    """
    wrap(fastapi_dependencies, "_validate_value_with_model_field", _checked)


def _checked(validate):
    def checked(*, field, value, values, loc):
        try:
            return validate(field=field, value=value, values=values, loc=loc)
        except WRONG_SHAPE as error:
            if tuple(loc[:1]) != ("body",):
                raise
            culprit = _culprit(field, value)
            logger.info("smoothsmoe: a request body vLLM's validators cannot read (%s: %s), field %s: a 400",
                        type(error).__name__, error, culprit)
            return None, [_validation_error(loc, value, culprit, error)]

    return checked


def _culprit(field, value: Any) -> str | None:
    """The first top-level field of `value` whose value its own declared type refuses (the
    value a before-validator read without checking); None when every one passes."""
    model = field.field_info.annotation
    if not (isinstance(value, dict) and isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    names = {_json_name(name, info): name for name, info in model.model_fields.items()}
    for key, item in value.items():
        if key in names and not _accepts(model, names[key], item):
            return key
    return None


def _json_name(name: str, info) -> str:
    alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
    return alias or name


@functools.cache
def _field_type(model: type[BaseModel], name: str) -> TypeAdapter:
    return TypeAdapter(model.model_fields[name].annotation)


def _accepts(model: type[BaseModel], name: str, item: Any) -> bool:
    try:
        _field_type(model, name).validate_python(item)
    except (ValidationError, *WRONG_SHAPE):  # refused, or its own validator crashed on it: refused too
        return False
    return True


def _validation_error(loc: tuple, value: Any, culprit: str | None, error: Exception) -> dict:
    """One error in pydantic's shape (type, loc, msg, input), as FastAPI collects them."""
    where = f"`{culprit}`" if culprit else "the request body"
    return {"type": "value_error", "loc": (*loc, culprit) if culprit else tuple(loc),
            "msg": f"Value error, {where} has a type or shape this server cannot read "
                   f"({type(error).__name__}: {error})",
            "input": value[culprit] if culprit else value}
