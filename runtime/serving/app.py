"""The HTTP app (Starlette): OpenAI routes under /v1 (openai_api), Ollama's under /api (ollama_api),
/health and /metrics. Handlers are module functions over the server context (context.py); both API
families' chat routes answer through the one answer path (answer.py) with a writer of their own.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import ollama_api, openai_api
from .access import APIKeyMiddleware, BrowserGuardMiddleware
from .apierror import APIError, from_error
from .context import ServerContext, endpoint, error_response, server
from .pool import ModelPool
from .settings import ServeSettings

log = logging.getLogger("edgevlm.serve")


async def health(request: Request) -> Response:
    state = server(request).state
    if state["fatal"]:
        return JSONResponse({"error": {"code": 500, "message": state["fatal"], "type": "server_error"}},
                            status_code=500)
    if not state["ready"]:          # the command-line models; a model loading on demand is not "unhealthy"
        return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                            status_code=503)
    return JSONResponse({"status": "ok"})


@endpoint("metrics")
async def metrics_route(request: Request) -> Response:
    body, ctype = server(request).metrics.render()
    return Response(body, media_type=ctype)


async def not_found(request: Request, exc: HTTPException) -> Response:
    err = APIError(exc.status_code, exc.detail or "Not found", code="not_found" if exc.status_code == 404 else None)
    return error_response(request, err)


@asynccontextmanager
async def lifespan(app: Starlette):
    import anyio

    ctx: ServerContext = app.state.ctx
    pool, state = ctx.pool, ctx.state
    pool.start_reaper()
    async with anyio.create_task_group():   # loads anyio's asyncio backend now, not in the first answer
        pass                                # (Starlette streams through it: ~0.25 s on that answer)

    async def preload() -> None:
        try:
            await pool.preload()
            state["ready"] = True
        except Exception as e:  # noqa: BLE001 - reported by /health and by `vlm serve` as it stops
            state["fatal"] = f"Loading {', '.join(pool.pinned_refs())} failed: {from_error(e).message}"
            log.error(state["fatal"])
            stop = getattr(app.state, "stop", None)
            if stop is not None:
                stop()

    loop = asyncio.get_running_loop()
    task = loop.create_task(preload()) if pool.pinned_refs() else None
    # SIGTERM (the CLI calls this from its signal handler): answers in progress get the grace period,
    # then end with an error event, just before uvicorn would cancel them mid-write.
    app.state.drain = lambda: loop.call_soon_threadsafe(loop.call_later, max(0.0, ctx.settings.grace_s - 0.3),
                                                        pool.expire)
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
        await pool.close()
        ctx.workers.close()


def create_app(settings: ServeSettings, pool: Optional[ModelPool] = None) -> Starlette:
    ctx = ServerContext.create(settings, pool)
    middleware = [Middleware(BrowserGuardMiddleware, settings=settings)]
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    if settings.api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=settings.api_key))
    routes = [Route(path, handler, methods=methods) for path, handler, methods in openai_api.ROUTES + ollama_api.ROUTES]
    routes += [Route("/health", health, methods=["GET"]), Route("/metrics", metrics_route, methods=["GET"])]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    app.state.ctx = ctx
    app.state.pool = ctx.pool
    app.state.settings = settings
    app.state.serve_state = ctx.state
    return app


__all__ = ["create_app", "APIKeyMiddleware"]
