"""Replacing one of vLLM's functions by a wrapper around it, once per process.

The corrections in this folder (corrections.py lists them) sit in front of vLLM's own
request handling instead of copying it: each wraps the vLLM function where the wrong
answer is made. vLLM looks most of them up at call time (a method on its class, a name in
its module), so rebinding that name is enough. install() may run twice (tests, a restart
in one process); the mark keeps a function from being wrapped twice by the same correction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def wrap(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Rebind `owner.name` (a class or a module) to `make(original)`, unless `make` already did.

    `make` receives vLLM's function and returns its replacement; the replacement keeps the
    original's name and docstring (functools.wraps) and a mark naming `make`.
    """
    original = getattr(owner, name)
    mark = f"_smoothsmoe_{make.__module__}.{make.__qualname__}"
    if getattr(original, mark, False):
        return
    replacement = functools.wraps(original)(make(original))
    setattr(replacement, mark, True)
    setattr(owner, name, replacement)


def check_first(owner: Any, name: str, check: Callable[[Any, Any], None]) -> None:
    """Make the async method `owner.name(self, request, ...)` run `check(self, request)` first.

    `check` raises a VLLMValidationError for a request it refuses; vLLM's exception handler
    (or the handler's own, for /v1/messages) turns that into a 400 with the error's parameter.
    """

    def make(handle):
        async def checked(self, request, *args, **kwargs):
            check(self, request)
            return await handle(self, request, *args, **kwargs)

        return checked

    make.__qualname__ = f"check_first.{check.__module__}.{check.__qualname__}"
    wrap(owner, name, make)
