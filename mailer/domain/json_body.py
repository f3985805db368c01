"""A JSON request body read into a pydantic model, with one-line errors. Pure."""

import json
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mailer.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)
Location = tuple[int | str, ...]


def dotted(loc: Location) -> str:
    """``list`` or ``events.3.email`` for pydantic's error location; ``body`` for the whole."""
    return ".".join(str(p) for p in loc) or "body"


def validated(raw: bytes, model: type[M], where: Callable[[Location], str] = dotted) -> M:
    """``raw`` as ``model``; ``InvalidInput`` naming the first problem (``where`` it is) otherwise.

    JSON is UTF-8 (RFC 8259): a charset parameter of the request is ignored, not looked up.
    """
    try:
        data: Any = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"{where(first['loc'])}: {first['msg']}") from None
