"""What every handler of `vlm serve` works over: the server context (settings, model pool, metrics,
worker pools, body budget, pixel limit, guard, readiness), made once per app and found on the
request; the one error boundary (``endpoint``), which also counts every answer; the request body,
read within its budgets and parsed; the models a request may name (for both families' model lists).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .apierror import APIError, from_error
from .bodies import BodyBudget, parse_json
from .metrics import Metrics
from .pool import ModelPool
from .settings import ServeSettings
from .translate import Parsed
from .workers import Workers

log = logging.getLogger("edgevlm.serve")

_INLINE_BODY = 8 * 1024     # smaller bodies without a schema are parsed and checked on the loop (no thread hop)
_SCHEMA_KEYS = (b'"response_format"', b'"json_schema"', b'"format"', b'"tools"')   # (tools: parameter schemas)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class ServerContext:
    """One server's shared parts; the handlers are module functions over it (``server(request)``)."""

    settings: ServeSettings
    pool: ModelPool
    metrics: Metrics
    workers: Workers
    bodies: BodyBudget                 # bodies held at once, all requests
    max_pixels: int
    guard: Optional[Any] = None        # guarding.ServerGuard with --guard
    state: dict = field(default_factory=dict)      # ready / fatal, for /health and `vlm serve`

    @classmethod
    def create(cls, settings: ServeSettings, pool: Optional[ModelPool] = None) -> "ServerContext":
        from ..config import load_config
        from ..inputs.media_budget import DEFAULT_MAX_PIXELS

        metrics = Metrics()
        pool = pool or ModelPool(settings)
        pool.metrics = metrics
        max_pixels = settings.max_image_pixels or load_config(settings.home).max_image_pixels or DEFAULT_MAX_PIXELS
        guard = None
        if settings.guard_mode and settings.guard_model:
            from .guarding import ServerGuard

            guard = ServerGuard(pool, settings.guard_mode, settings.guard_model, settings.guard_policy)
        return cls(settings=settings, pool=pool, metrics=metrics, workers=Workers(settings),
                   bodies=BodyBudget(max(4 * settings.max_body_bytes, 64 << 20)), max_pixels=max_pixels,
                   guard=guard, state={"ready": not pool.pinned_refs(), "fatal": None})


def server(request: Request) -> ServerContext:
    return request.app.state.ctx


def error_response(request: Request, err: APIError) -> Response:
    """``err`` in the shape of the request's API family (Ollama's under /api/, else OpenAI's)."""
    body = err.ollama_body() if request.scope["path"].startswith("/api/") else err.openai_body()
    try:
        return JSONResponse(body, status_code=err.status, headers=err.headers)
    except Exception:           # noqa: BLE001 - the error path itself must always answer
        return JSONResponse({"error": {"message": "Bad request.", "type": err.type, "param": None, "code": err.code}},
                            status_code=err.status)


def stream_error(e: Exception) -> APIError:
    """An error after the headers were sent; logged with its traceback only when it is our own bug."""
    err = from_error(e)
    if err.status >= 500 and not isinstance(e, APIError):
        log.error("stream failed: %s", e, exc_info=e)
    return err


def endpoint(name: str):
    """A handler's error boundary: typed errors -> status + body in the route family's shape (a client
    gone: 499); every answer counted under ``name`` and the model that answered (``scope["vlm.model"]``)."""
    def deco(fn: Callable[[Request], Awaitable[Response]]):
        async def handler(request: Request) -> Response:
            model = "-"
            try:
                resp = await fn(request)
                model = request.scope.get("vlm.model", "-")
            except (ClientGone, ClientDisconnect):    # (ClientDisconnect: gone while sending its body)
                resp = Response(status_code=499)
            except Exception as e:      # noqa: BLE001 - the one error boundary of the server
                err = from_error(e)
                if err.status >= 500 and not isinstance(e, APIError):
                    log.error("%s %s failed: %s", request.method, request.scope["path"].encode(
                        "utf-8", "backslashreplace").decode(), e, exc_info=e)
                model = request.scope.get("vlm.model", "-")
                resp = error_response(request, err)
            server(request).metrics.requests.labels(name, model, str(resp.status_code)).inc()
            return resp
        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler
    return deco


async def read_body(request: Request, parse: Callable[[Any, ServeSettings], Parsed]) -> Parsed:
    """The request, parsed and checked: on the loop when small and schema-free, else in the checks pool
    (a big body or a JSON schema can take a second of pure Python)."""
    ctx = server(request)
    async with ctx.bodies.hold(request, ctx.settings.max_body_bytes) as data:
        if len(data) <= _INLINE_BODY and not any(k in data for k in _SCHEMA_KEYS):
            return parse(parse_json(data), ctx.settings)
        return await ctx.workers.check(lambda: parse(parse_json(data), ctx.settings))


def installed(ctx: ServerContext) -> list[dict]:
    """Every model a request may name: the command-line ones and the installed registry ones."""
    from ..models.store import Store

    pool = ctx.pool
    loaded = {e.id for e in pool.loaded()}
    seen, out = set(), []
    for ref in ctx.settings.models:
        r = pool.resolve(ref)
        mid = pool.model_id(r)
        if mid not in seen:
            seen.add(mid)
            out.append({"id": mid, "path": r.artifact.path, "format": r.artifact.format, "loaded": mid in loaded,
                        "size": None, "key": r.artifact_spec.key if r.artifact_spec else ""})
    for inst in Store(ctx.settings.home).installed():
        mid = f"{inst.alias}:{inst.key}"
        if mid not in seen:
            seen.add(mid)
            out.append({"id": mid, "path": inst.path, "format": inst.manifest.get("format", ""),
                        "loaded": mid in loaded, "size": inst.size, "key": inst.key,
                        "manifest": inst.manifest})
    return out


def mtime(path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0
