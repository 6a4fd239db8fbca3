"""The HTTP app (Starlette): OpenAI routes under /v1, Ollama's under /api, /health and /metrics.

Order of work for a chat request: read the body (capped), check it, decode its images off the event
loop, wait for the model's turn (bounded queue), then generate on the model's thread. Nothing is sent
until the first chunk exists, so an error in the prefill (context overflow, a schema the engine
refuses, an image the engine cannot take) still gets its status code, streaming or not. A client that
goes away while waiting, while the prompt is evaluated or while tokens stream, stops its generation
after the current token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .apierror import APIError, from_error
from .bodies import BodyBudget, parse_json
from .access import APIKeyMiddleware, BrowserGuardMiddleware
from .metrics import Metrics
from .pool import ChunkStream, Lease, ModelPool
from .guarding import record as guard_record
from .settings import ServeSettings
from .translate import (Parsed, build_request, check_image_count, dumps, finish, now_iso, ollama_final, ollama_piece,
                        openai_chunk, openai_completion, openai_content_frames, openai_usage_chunk, parse_ollama_chat,
                        parse_ollama_generate, parse_openai, timings)
from .workers import Workers

log = logging.getLogger("edgevlm.serve")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _Blocked(Exception):
    """The guard judged the question unsafe: answered with finish_reason content_filter, not an error."""

    def __init__(self, model: str, verdicts: dict):
        super().__init__("blocked")
        self.model, self.verdicts = model, verdicts


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

_INLINE_BODY = 8 * 1024     # smaller bodies without a schema are parsed and checked on the loop (no thread hop)
_SCHEMA_KEYS = (b'"response_format"', b'"json_schema"', b'"format"')


async def _disconnected(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, aw: Awaitable, on_orphan: Optional[Callable[[Any], None]] = None):
    """Await ``aw`` unless the client disconnects first (then cancel it and raise ClientGone).
    ``on_orphan(result)`` cleans up a result that arrived as the client left."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is None and on_orphan is not None:
        on_orphan(task.result())
    raise ClientGone()


class _ChunkStreamingResponse(StreamingResponse):
    """A streaming response that stops the generation as soon as the response ends, however it ends."""

    def __init__(self, content, stream: ChunkStream, **kw):
        super().__init__(content, **kw)
        self._stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _stream_error(e: Exception) -> APIError:
    """An error after the headers were sent; logged with its traceback only when it is our own bug."""
    err = from_error(e)
    if err.status >= 500 and not isinstance(e, APIError):
        log.error("stream failed: %s", e, exc_info=e)
    return err


def _error_response(request: Request, err: APIError) -> Response:
    body = err.ollama_body() if request.scope["path"].startswith("/api/") else err.openai_body()
    try:
        return JSONResponse(body, status_code=err.status, headers=err.headers)
    except Exception:           # noqa: BLE001 - the error path itself must always answer
        return JSONResponse({"error": {"message": "Bad request.", "type": err.type, "param": None, "code": err.code}},
                            status_code=err.status)


# --------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------

def create_app(settings: ServeSettings, pool: Optional[ModelPool] = None) -> Starlette:
    from ..config import load_config
    from ..inputs.media import DEFAULT_MAX_PIXELS

    metrics = Metrics()
    workers = Workers(settings)
    bodies = BodyBudget(max(4 * settings.max_body_bytes, 64 << 20))     # bodies held at once, all requests
    pool = pool or ModelPool(settings)
    pool.metrics = metrics
    max_pixels = settings.max_image_pixels or load_config(settings.home).max_image_pixels or DEFAULT_MAX_PIXELS
    state = {"ready": not pool.pinned_refs(), "fatal": None}
    guard = None
    if settings.guard_mode and settings.guard_model:
        from .guarding import ServerGuard

        guard = ServerGuard(pool, settings.guard_mode, settings.guard_model, settings.guard_policy)

    def endpoint(name: str):
        """Wrap a handler: typed errors -> status + body in the route family's shape; count every answer."""
        def deco(fn: Callable[[Request], Awaitable[Response]]):
            async def handler(request: Request) -> Response:
                model = "-"
                try:
                    resp = await fn(request)
                    model = request.scope.get("vlm.model", "-")
                except (ClientGone, ClientDisconnect):    # (ClientDisconnect: gone while sending its body)
                    resp = Response(status_code=499)
                except _Blocked as b:
                    model = request.scope["vlm.model"] = b.model
                    resp = blocked_response(request, name, b)
                except Exception as e:      # noqa: BLE001 - the one error boundary of the server
                    err = from_error(e)
                    if err.status >= 500 and not isinstance(e, APIError):
                        log.error("%s %s failed: %s", request.method, request.scope["path"].encode(
                            "utf-8", "backslashreplace").decode(), e, exc_info=e)
                    model = request.scope.get("vlm.model", "-")
                    resp = _error_response(request, err)
                metrics.requests.labels(name, model, str(resp.status_code)).inc()
                return resp
            return handler
        return deco

    # -- the generation path, shared by both API families ------------------------------------------
    async def body(request: Request, parse: Callable[[Any, ServeSettings], Parsed]) -> Parsed:
        """The request, parsed and checked: on the loop when small and schema-free, else in the checks pool
        (a big body or a JSON schema can take a second of pure Python)."""
        async with bodies.hold(request, settings.max_body_bytes) as data:
            if len(data) <= _INLINE_BODY and not any(k in data for k in _SCHEMA_KEYS):
                return parse(parse_json(data), settings)
            return await workers.check(lambda: parse(parse_json(data), settings))

    async def start(request: Request, parsed: Parsed, verdicts: dict) -> tuple[Lease, ChunkStream, Any, float, Any]:
        t0 = time.perf_counter()
        if parsed.n_images:             # fetching and decoding: in their own pools, within the pixel budgets
            check_image_count(parsed, settings)
            resolved = pool.resolve(parsed.model)
            if pool.takes_images(resolved) is False:       # known before a single pixel is decoded
                raise APIError(422, f"{pool.model_id(resolved)} has no vision projector, so it cannot read images; "
                                    "use a vision model.", code="unprocessable", param="messages")
            chat = build_request(parsed, settings, max_pixels, await workers.images(parsed, max_pixels))
        else:                           # nothing to decode: no thread hop (it costs TTFT on a busy CPU)
            chat = build_request(parsed, settings, max_pixels)
        if guard is not None and guard.checks_input:
            v = verdicts["input"] = await until_disconnect(request, guard.check(chat.messages))
            if not v.safe:
                raise _Blocked(pool.model_id(pool.resolve(parsed.model)), verdicts)
        lease: Lease = await until_disconnect(request, pool.acquire(parsed.model, parsed.keep_alive_s),
                                              on_orphan=lambda lease: lease.release())
        entry = lease.entry
        request.scope["vlm.model"] = entry.id
        spec = entry.resolved.model
        if (spec is not None and spec.completion_only) or not lease.backend.chat_template:
            chat.options.raw = True
        stream = lease.stream(chat, whole=not parsed.stream)
        try:
            first = await until_disconnect(request, stream.__anext__())
        except BaseException:
            stream.cancel()
            raise
        return lease, stream, first, t0, chat

    async def judged(request: Request, chat, text: str, last, verdicts: dict):
        """The answer as the client may see it: (text, last chunk), withheld when the guard says unsafe."""
        if guard is None or not guard.checks_output:
            return text, last
        v = verdicts["output"] = await until_disconnect(request, guard.check(chat.messages, text))
        if v.safe:
            return text, last
        return "", dataclasses.replace(last, finish_reason="content_filter")

    def blocked_response(request: Request, route: str, b: _Blocked) -> Response:
        from ..protocol import Chunk

        none = Chunk(text="", finish_reason="content_filter")
        extra = {"guard": guard_record(b.verdicts)}
        if route.startswith("ollama"):
            key = "response" if route == "ollama_generate" else "message"
            doc = {**ollama_final(b.model, none, 0.0, 0.0, key=key), **extra}
            return JSONResponse(doc)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        doc = {**openai_completion(rid, b.model, created, "", none), **extra}
        return JSONResponse(doc)

    async def collect(first, stream: ChunkStream):
        parts, last = [first.text], first
        while last.finish_reason is None:
            last = await stream.__anext__()
            parts.append(last.text)
        return "".join(parts), last

    # -- OpenAI ------------------------------------------------------------------------------------
    @endpoint("chat_completions")
    async def chat_completions(request: Request) -> Response:
        parsed = await body(request, parse_openai)
        verdicts: dict = {}
        lease, stream, first, _t0, chat = await start(request, parsed, verdicts)
        model = lease.entry.id
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        extra = (lambda: {"guard": guard_record(verdicts)}) if guard is not None else dict
        if not parsed.stream:
            try:
                text, last = await until_disconnect(request, collect(first, stream))
            finally:
                stream.cancel()
            metrics.observe_answer(model, last)
            text, last = await judged(request, chat, text, last, verdicts)
            return JSONResponse({**openai_completion(rid, model, created, text, last), **extra()})
        hold = guard is not None and guard.checks_output

        content_frame = openai_content_frames(rid, model, created)

        async def events() -> AsyncIterator[str | bytes]:
            chunk = first
            yield f"data: {dumps(openai_chunk(rid, model, created, {'role': 'assistant', 'content': ''}))}\n\n"
            held: list[str] = []
            try:
                while True:
                    if chunk.text and hold:
                        held.append(chunk.text)
                    elif chunk.text:
                        yield content_frame(chunk.text)
                    if chunk.finish_reason is not None:
                        break
                    chunk = await stream.__anext__()
                if hold:                    # the answer is sent only once the guard has judged it
                    text, chunk = await judged(request, chat, "".join(held), chunk, verdicts)
                    if text:
                        yield f"data: {dumps(openai_chunk(rid, model, created, {'content': text}))}\n\n"
            except Exception as e:          # noqa: BLE001 - after the headers, errors travel as an event
                yield f"data: {dumps(_stream_error(e).openai_body())}\n\n"
                return
            metrics.observe_answer(model, chunk)
            yield (f"data: {dumps(openai_chunk(rid, model, created, {}, finish(chunk), timings=timings(chunk), **extra()))}"
                   "\n\n")
            if parsed.include_usage:
                yield f"data: {dumps(openai_usage_chunk(rid, model, created, chunk))}\n\n"
            yield "data: [DONE]\n\n"

        return _ChunkStreamingResponse(events(), stream, media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _model_doc(mid: str, created: int, loaded: bool) -> dict:
        return {"id": mid, "object": "model", "created": created, "owned_by": "edgevlm", "loaded": loaded}

    def _installed() -> list[dict]:
        """Every model a request may name: the command-line ones and the installed registry ones."""
        from ..models.store import Store

        loaded = {e.id for e in pool.loaded()}
        seen, out = set(), []
        for ref in settings.models:
            r = pool.resolve(ref)
            mid = pool.model_id(r)
            if mid not in seen:
                seen.add(mid)
                out.append({"id": mid, "path": r.artifact.path, "format": r.artifact.format, "loaded": mid in loaded,
                            "size": None, "key": r.artifact_spec.key if r.artifact_spec else ""})
        for inst in Store(settings.home).installed():
            mid = f"{inst.alias}:{inst.key}"
            if mid not in seen:
                seen.add(mid)
                out.append({"id": mid, "path": inst.path, "format": inst.manifest.get("format", ""),
                            "loaded": mid in loaded, "size": inst.size, "key": inst.key,
                            "manifest": inst.manifest})
        return out

    def _mtime(path) -> int:
        try:
            return int(path.stat().st_mtime)
        except OSError:
            return 0

    @endpoint("models")
    async def list_models(request: Request) -> Response:
        data = [_model_doc(m["id"], _mtime(m["path"]), m["loaded"]) for m in _installed()]
        return JSONResponse({"object": "list", "data": data})

    @endpoint("models")
    async def get_model(request: Request) -> Response:
        mid = request.path_params["model"]
        r = pool.resolve(mid)
        return JSONResponse(_model_doc(pool.model_id(r), _mtime(r.artifact.path),
                                       any(e.id == pool.model_id(r) for e in pool.loaded())))

    # -- Ollama ------------------------------------------------------------------------------------
    async def _ollama(request: Request, parsed: Parsed, key: str) -> Response:
        if not any(m.role == "user" for m in parsed.messages):
            # Ollama's convention: no prompt loads the model (keep_alive 0: unloads it)
            lease = await pool.acquire(parsed.model, parsed.keep_alive_s)
            model = request.scope["vlm.model"] = lease.entry.id
            lease.release()
            reason = "unload" if parsed.keep_alive_s == 0 else "load"
            if parsed.keep_alive_s == 0 and lease.entry.idle:
                pool.unload(lease.entry)
            doc = {"model": model, "created_at": now_iso(), key: "" if key == "response" else
                   {"role": "assistant", "content": ""}, "done": True, "done_reason": reason}
            return JSONResponse(doc)
        verdicts: dict = {}
        lease, stream, first, t0, chat = await start(request, parsed, verdicts)
        model, load_s = lease.entry.id, lease.entry.load_s
        if not parsed.stream or (guard is not None and guard.checks_output):
            # (with the output guard on, the answer is judged whole before anything is sent)
            try:
                text, last = await until_disconnect(request, collect(first, stream))
            finally:
                stream.cancel()
            metrics.observe_answer(model, last)
            text, last = await judged(request, chat, text, last, verdicts)
            doc = ollama_final(model, last, time.perf_counter() - t0, load_s, key=key)
            if guard is not None:
                doc["guard"] = guard_record(verdicts)
            doc[key] = text if key == "response" else {"role": "assistant", "content": text}
            return JSONResponse(doc)

        async def lines() -> AsyncIterator[str]:
            chunk = first
            try:
                while True:
                    if chunk.text:
                        yield dumps(ollama_piece(model, chunk.text, key=key)) + "\n"
                    if chunk.finish_reason is not None:
                        break
                    chunk = await stream.__anext__()
            except Exception as e:          # noqa: BLE001
                yield dumps(_stream_error(e).ollama_body()) + "\n"
                return
            metrics.observe_answer(model, chunk)
            yield dumps(ollama_final(model, chunk, time.perf_counter() - t0, load_s, key=key)) + "\n"

        return _ChunkStreamingResponse(lines(), stream, media_type="application/x-ndjson")

    @endpoint("ollama_chat")
    async def ollama_chat(request: Request) -> Response:
        return await _ollama(request, await body(request, parse_ollama_chat), "message")

    @endpoint("ollama_generate")
    async def ollama_generate(request: Request) -> Response:
        return await _ollama(request, await body(request, parse_ollama_generate), "response")

    @endpoint("ollama_tags")
    async def ollama_tags(request: Request) -> Response:
        out = []
        for m in _installed():
            files = (m.get("manifest") or {}).get("files") or []
            digest = next((f.get("sha256") for f in files if f.get("sha256")), "") or ""
            out.append({"name": m["id"], "model": m["id"],
                        "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_mtime(m["path"]))),
                        "size": m["size"] or 0, "digest": digest,
                        "details": {"format": m["format"], "family": "", "families": None, "parameter_size": "",
                                    "quantization_level": m["key"]}})
        return JSONResponse({"models": out})

    @endpoint("ollama_ps")
    async def ollama_ps(request: Request) -> Response:
        out = []
        for e in pool.loaded():
            idle_s = 0.0 if not e.idle else time.monotonic() - e.last_used
            try:
                expires = ("2318-01-01T00:00:00Z" if e.keep_alive_s is None else   # Ollama's "forever"
                           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + e.keep_alive_s - idle_s)))
            except (OverflowError, ValueError, OSError):
                expires = "2318-01-01T00:00:00Z"
            out.append({"name": e.id, "model": e.id, "size": e.estimate, "size_vram": 0, "expires_at": expires,
                        "details": {"format": e.resolved.artifact.format}})
        return JSONResponse({"models": out})

    @endpoint("ollama_version")
    async def ollama_version(request: Request) -> Response:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("edgevlm")
        except PackageNotFoundError:
            v = "0"
        return JSONResponse({"version": v})

    # -- operations --------------------------------------------------------------------------------
    async def health(request: Request) -> Response:
        if state["fatal"]:
            return JSONResponse({"error": {"code": 500, "message": state["fatal"], "type": "server_error"}},
                                status_code=500)
        if not state["ready"]:          # the command-line models; a model loading on demand is not "unhealthy"
            return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @endpoint("metrics")
    async def metrics_route(request: Request) -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        err = APIError(exc.status_code, exc.detail or "Not found", code="not_found" if exc.status_code == 404 else None)
        return _error_response(request, err)

    @asynccontextmanager
    async def lifespan(app):
        import anyio

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
        app.state.drain = lambda: loop.call_soon_threadsafe(loop.call_later, max(0.0, settings.grace_s - 0.3),
                                                            pool.expire)
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await pool.close()
            workers.close()

    middleware = [Middleware(BrowserGuardMiddleware, settings=settings)]
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    if settings.api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=settings.api_key))
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/api/chat", ollama_chat, methods=["POST"]),
        Route("/api/generate", ollama_generate, methods=["POST"]),
        Route("/api/tags", ollama_tags, methods=["GET"]),
        Route("/api/ps", ollama_ps, methods=["GET"]),
        Route("/api/version", ollama_version, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    app.state.pool = pool
    app.state.settings = settings
    app.state.serve_state = state
    return app


__all__ = ["create_app", "APIKeyMiddleware"]
