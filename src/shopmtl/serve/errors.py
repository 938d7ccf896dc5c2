"""Every error the service answers has one JSON shape, and none repeats a request value.

``{"error": {"code": <stable code>, "message": <what is wrong, in words>, "fields": [<where>]}}``

Clients branch on ``code`` (``CODES``: stable across versions), people read ``message``,
``fields`` names the places (``body.candidates.3.title``). Request bodies hold customer text
(utterances, queries, reviews), so no answer and no log line carries a value: pydantic's
``input`` and ``ctx`` are dropped, and the few error types whose *message* quotes the input are
answered by their type alone. A field's name (also an unknown one a client sent) is its place,
not a value, and is kept, as ``Contract.read`` keeps it. shopmtl's ``DataError`` messages name
fields and never values by design (``data.contract``), so they pass as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# HTTP status -> the code of an error answered with it (a 422 from the model path included)
CODES: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    422: "invalid_request",
    429: "overloaded",
    500: "internal",
    503: "not_ready",
}
STORE_DOWN = "feature_store_unavailable"  # 503: the feature store does not answer (Redis down)
# every code an answer of a status may carry: the one of ``CODES``, and those of the admin
# endpoints and the feature store (what a client, and the schema fuzz, may branch on)
STATUS_CODES: dict[int, frozenset[str]] = {
    **{status: frozenset({code}) for status, code in CODES.items()},
    401: frozenset({"unauthorized"}),
    403: frozenset({"admin_disabled"}),
    409: frozenset({"reload_in_progress", "reload_incompatible"}),
    422: frozenset({CODES[422], "reload_failed"}),
    503: frozenset({CODES[503], STORE_DOWN}),
}
MAX_LISTED = 5  # validation problems spelled out in one message; the rest are counted

# pydantic error types whose message template interpolates the input (or a validator's text)
_QUOTES_INPUT = frozenset({"union_tag_invalid", "value_error", "assertion_error",
                           "get_attribute_error"})
_FIELD = re.compile(r"(?:field|column) '([^']+)'")


def code_of(status: int) -> str:
    return CODES.get(status, "internal" if status >= 500 else "bad_request")


def error_json(code: str, message: str, fields: Sequence[str] = ()) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "fields": list(fields)}}


def error_bytes(code: str, message: str, fields: Sequence[str] = ()) -> bytes:
    return json.dumps(error_json(code, message, fields)).encode()


def loc_path(loc: Iterable[Any]) -> str:
    """pydantic's ``("body", "candidates", 3, "title")`` as ``body.candidates.3.title``."""
    return ".".join(str(p) for p in loc)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """(message, fields) of pydantic/FastAPI validation errors, built from their place and
    message template only (``input``, ``ctx`` and the request body are never read)."""
    fields: list[str] = []
    parts: list[str] = []
    for e in errors:
        path = loc_path(e.get("loc", ()))
        if path not in fields:
            fields.append(path)
        kind = str(e.get("type", "invalid"))
        msg = kind if kind in _QUOTES_INPUT else str(e.get("msg", kind))
        parts.append(f"{path}: {msg}")
    more = len(parts) - MAX_LISTED
    message = "; ".join(parts[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
    return message or "invalid request", fields


def data_error_fields(message: str) -> list[str]:
    """The fields a shopmtl ``DataError`` message names (``field 'age'``, ``column 'x'``)."""
    return list(dict.fromkeys(_FIELD.findall(message)))
