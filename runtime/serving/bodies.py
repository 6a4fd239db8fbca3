"""Request bodies as data the rest of the server can trust: read with a size cap (each, and all at once),
parsed as JSON with a depth limit, no lone UTF-16 surrogates in any string, no non-finite numbers.

Python's ``json`` accepts what JSON text allows but our code cannot use: ``"\\ud800"`` (a lone surrogate,
which no UTF-8 encoder takes: it used to fail as a 500 wherever the string was written out, the error
handler included), ``NaN`` / ``Infinity`` and ``1e400`` (an infinite float), and nesting as deep as
the interpreter's recursion limit (every recursive walk after it then raised ``RecursionError``).
Each is a 400 here, before any handler sees the document.
"""
from __future__ import annotations

import json
import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from .apierror import APIError

MAX_DEPTH = 64
"""Arrays and objects nested deeper than this are refused (an OpenAI request needs ~6; a response_format
schema of 30 nested objects fits)."""


def _too_deep() -> APIError:
    return APIError(400, f"The request body is nested too deeply (more than {MAX_DEPTH} levels of arrays and "
                         "objects); flatten it.", code="invalid_json")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:24]} is out of range")
    return v


def _surrogate(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"The request holds a lone UTF-16 surrogate (U+{ord(s[e.start]):04X}) in a string; "
                            "send valid Unicode text.", code="invalid_unicode") from None


def check_tree(doc: Any, max_depth: int = MAX_DEPTH) -> None:
    """Refuse documents nested deeper than ``max_depth`` or holding a string no UTF-8 encoder takes (keys
    too). Iterative: a deep document cannot exhaust the stack here."""
    stack = [(doc, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > max_depth:
            raise _too_deep()
        items = x.items() if isinstance(x, dict) else enumerate(x)
        for k, v in items:
            if type(k) is str and not k.isascii():
                _surrogate(k)
            if type(v) is str:
                if not v.isascii():
                    _surrogate(v)
            elif isinstance(v, (dict, list)):
                stack.append((v, depth + 1))


def parse_json(data: bytes) -> Any:
    """The body as JSON, or a 400 that says what is wrong with it."""
    try:
        doc = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON ({_printable(str(e))}).", code="invalid_json") from None
    if isinstance(doc, (dict, list)):
        check_tree(doc)
    elif isinstance(doc, str) and not doc.isascii():
        _surrogate(doc)
    return doc


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:300]


class BodyBudget:
    """Bytes of request bodies held at once, all requests together (``--max-body`` bounds one): from the
    first byte read until the body is parsed. Past it a request is 503 with ``Retry-After`` rather than
    one more buffer: a hundred clients sending 32 MiB each must not take 3 GiB."""

    def __init__(self, total: int):
        self.total, self.used = total, 0

    @asynccontextmanager
    async def hold(self, request, limit: int) -> AsyncIterator[bytearray]:
        """The body's bytes (at most ``limit``: 413 from Content-Length or while reading), counted until
        the block ends."""
        def too_large() -> APIError:
            return APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                            code="request_too_large")

        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise too_large()
        buf, taken = bytearray(), 0
        try:
            async for piece in request.stream():
                if len(buf) + len(piece) > limit:
                    raise too_large()
                if self.used + len(piece) > self.total:
                    raise APIError(503, "The server is receiving too many large requests at once; retry.",
                                   type="server_error", code="server_busy", headers={"Retry-After": "1"})
                self.used += len(piece)
                taken += len(piece)
                buf += piece
            yield buf
        finally:
            self.used -= taken


__all__ = ["MAX_DEPTH", "BodyBudget", "check_tree", "parse_json"]
