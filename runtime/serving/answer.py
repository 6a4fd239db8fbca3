"""The one answer path of `vlm serve`: both API families (openai_api, ollama_api) parse their request
and hand it here with a ``Writer`` of their own, which renders what the path produces. Guard, images,
the model's turn, cancellation, metrics and streaming exist once, here.

Order of work: decode the request's images off the event loop (within the pixel budgets), check the
question with the guard, wait for the model's turn (bounded queue), then generate on the model's
thread. Nothing is sent until the first chunk exists, so an error in the prefill (context overflow, a
schema the engine refuses, an image the engine cannot take) still gets its status code, streaming or
not. A client that goes away while waiting, while the prompt is evaluated or while tokens stream,
stops its generation after the current token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional, Protocol, Union

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..protocol import Chunk
from .apierror import APIError
from .context import ClientGone, ServerContext, server, stream_error
from .guarding import record as guard_record
from .pool import ChunkStream, Lease
from .tool_calls import plan_for, read_answer
from .translate import Parsed, build_request, check_image_count, finish

Frame = Union[str, bytes]


@dataclass
class Final:
    """How an answer ended, for a writer to render: the whole response when not streamed, the closing
    frames when streamed."""

    model: str                     # the model that answered (its id in /v1/models)
    last: Chunk                    # the last chunk: token counts and timings
    finish_reason: str             # what the client is told: stop, length, content_filter (the guard)
    text: str = ""                 # the whole answer's text (when streamed, already sent piece by piece)
    message: dict = field(default_factory=dict)    # more of the assistant message beside its text, as
    # structured fields (tool calling puts its calls here); each writer renders them in its family's shape
    extra: dict = field(default_factory=dict)      # top-level fields of the response (the guard's record)
    total_s: float = 0.0           # from the request's start to its end (Ollama's total_duration)
    load_s: float = 0.0            # the model's load time (Ollama's load_duration)


class Writer(Protocol):
    """One API family's rendering of an answer. The answer path calls, for a whole answer, ``whole``;
    for a streamed one ``start`` once the model is known, ``text`` per piece of text, then ``end`` (or
    ``failed`` when an error comes after the headers)."""

    media_type: str                # of a streamed answer
    headers: dict                  # of a streamed answer
    streams_guarded: bool          # with the answer checked by the guard: still stream (the text held
    # until judged, then sent in one piece), or answer whole

    def whole(self, final: Final) -> dict: ...
    def start(self, model: str) -> Iterable[Frame]: ...
    def text(self, piece: str) -> Frame: ...
    def end(self, final: Final) -> Iterable[Frame]: ...
    def failed(self, err: APIError) -> Frame: ...


class Blocked(Exception):
    """The guard judged the question unsafe: answered with finish_reason content_filter, not an error."""

    def __init__(self, model: str, verdicts: dict):
        super().__init__("blocked")
        self.model, self.verdicts = model, verdicts


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


class ChunkStreamingResponse(StreamingResponse):
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


async def _start(ctx: ServerContext, request: Request, parsed: Parsed,
                 verdicts: dict) -> tuple[Lease, ChunkStream, Chunk, float, Any, Any]:
    """Images decoded, the question judged, the model's turn, the first chunk: (lease, stream, first
    chunk, start time, the ChatRequest before any tool plan rewrote it, the tool plan or None)."""
    pool, guard = ctx.pool, ctx.guard
    t0 = time.perf_counter()
    if parsed.n_images:             # fetching and decoding: in their own pools, within the pixel budgets
        check_image_count(parsed, ctx.settings)
        resolved = pool.resolve(parsed.model)
        if pool.takes_images(resolved) is False:       # known before a single pixel is decoded
            raise APIError(422, f"{pool.model_id(resolved)} has no vision projector, so it cannot read images; "
                                "use a vision model.", code="unprocessable", param="messages")
        chat = build_request(parsed, ctx.settings, ctx.max_pixels, await ctx.workers.images(parsed, ctx.max_pixels))
    else:                           # nothing to decode: no thread hop (it costs TTFT on a busy CPU)
        chat = build_request(parsed, ctx.settings, ctx.max_pixels)
    if guard is not None and guard.checks_input:
        v = verdicts["input"] = await until_disconnect(request, guard.check(chat.messages))
        if not v.safe:
            raise Blocked(pool.model_id(pool.resolve(parsed.model)), verdicts)
    lease: Lease = await until_disconnect(request, pool.acquire(parsed.model, parsed.keep_alive_s),
                                          on_orphan=lambda lease: lease.release())
    entry = lease.entry
    request.scope["vlm.model"] = entry.id
    spec = entry.resolved.model
    if (spec is not None and spec.completion_only) or not lease.backend.chat_template:
        chat.options.raw = True
    plan, judged = None, chat      # (the guard judges the conversation as sent, not as planned for the template)
    if parsed.tools is not None:    # the model's template decides where the tools go and the call syntax
        try:
            # (off the loop: the first render of a template's probe, the preamble's JSON of big schemas)
            plan, chat = await ctx.workers.check(plan_for, parsed.tools, lease.backend, chat)
        except BaseException:
            lease.release()
            raise
    stream = lease.stream(chat, whole=not parsed.stream)
    try:
        first = await until_disconnect(request, stream.__anext__())
    except BaseException:
        stream.cancel()
        raise
    return lease, stream, first, t0, judged, plan


async def _judged(ctx: ServerContext, request: Request, chat, text: str, last: Chunk, verdicts: dict):
    """The answer as the client may see it: (text, last chunk), withheld when the guard says unsafe."""
    guard = ctx.guard
    if guard is None or not guard.checks_output:
        return text, last
    v = verdicts["output"] = await until_disconnect(request, guard.check(chat.messages, text))
    if v.safe:
        return text, last
    return "", dataclasses.replace(last, finish_reason="content_filter")


async def _collect(first: Chunk, stream: ChunkStream) -> tuple[str, Chunk]:
    parts, last = [first.text], first
    while last.finish_reason is None:
        last = await stream.__anext__()
        parts.append(last.text)
    return "".join(parts), last


async def answer(request: Request, parsed: Parsed, writer: Writer) -> Response:
    """Answer ``parsed`` (a checked chat request of either family) through ``writer``: whole or streamed."""
    ctx = server(request)
    guard = ctx.guard
    verdicts: dict = {}
    extra = (lambda: {"guard": guard_record(verdicts)}) if guard is not None else dict
    try:
        lease, stream, first, t0, chat, plan = await _start(ctx, request, parsed, verdicts)
    except Blocked as b:
        request.scope["vlm.model"] = b.model
        none = Chunk(text="", finish_reason="content_filter")
        return JSONResponse(writer.whole(Final(b.model, none, "content_filter", extra=extra())))
    model, load_s = lease.entry.id, lease.entry.load_s
    judge = guard is not None and guard.checks_output
    if not parsed.stream or (judge and not writer.streams_guarded):
        try:
            text, last = await until_disconnect(request, _collect(first, stream))
        finally:
            stream.cancel()
        ctx.metrics.observe_answer(model, last)
        if plan is not None:
            return JSONResponse(writer.whole(await _tool_final(ctx, request, chat, writer, plan, text, last, verdicts,
                                                               model=model, extra=extra(), t0=t0, load_s=load_s)))
        text, last = await _judged(ctx, request, chat, text, last, verdicts)
        return JSONResponse(writer.whole(Final(model, last, finish(last), text, extra=extra(),
                                               total_s=time.perf_counter() - t0, load_s=load_s)))

    async def frames() -> AsyncIterator[Frame]:
        chunk = first
        for frame in writer.start(model):
            yield frame
        parts: list[str] = []
        try:
            while True:
                if chunk.text:
                    parts.append(chunk.text)
                    if not judge:
                        yield writer.text(chunk.text)
                if chunk.finish_reason is not None:
                    break
                chunk = await stream.__anext__()
            text = "".join(parts)
            if judge:                   # the answer is sent only once the guard has judged it
                text, chunk = await _judged(ctx, request, chat, text, chunk, verdicts)
                if text:
                    yield writer.text(text)
        except Exception as e:          # noqa: BLE001 - after the headers, errors travel in the stream
            yield writer.failed(stream_error(e))
            return
        ctx.metrics.observe_answer(model, chunk)
        for frame in writer.end(Final(model, chunk, finish(chunk), text, extra=extra(),
                                      total_s=time.perf_counter() - t0, load_s=load_s)):
            yield frame

    async def tool_frames() -> AsyncIterator[Frame]:
        """Streamed with tools: free text as text, each call as the writer's tool deltas while it is written
        (writers without them, Ollama's, get the calls in their last object); judged first with --guard."""
        chunk = first
        for frame in writer.start(model):
            yield frame
        ts = plan.stream()
        live = hasattr(writer, "tool_delta")
        try:
            while True:
                if chunk.text:
                    for ev in ts.feed(chunk.text):
                        if judge:
                            continue
                        if ev[0] == "content":
                            yield writer.text(ev[1])
                        elif live:
                            yield writer.tool_delta(ev)
                if chunk.finish_reason is not None:
                    break
                chunk = await stream.__anext__()
            fin = await _tool_final(ctx, request, chat, writer, plan, ts.text, chunk, verdicts, model=model,
                                    extra=extra(), t0=t0, load_s=load_s, stream=ts)
            if judge and fin.finish_reason != "content_filter":
                if fin.text:
                    yield writer.text(fin.text)
                if live:
                    for i, c in enumerate(fin.answer.calls):
                        yield writer.tool_delta(("call", i, c.id, c.name))
                        yield writer.tool_delta(("arguments", i, c.arguments))
            if live:
                fin.message = {}        # (the calls went out as deltas)
        except Exception as e:          # noqa: BLE001 - after the headers, errors travel in the stream
            yield writer.failed(stream_error(e))
            return
        ctx.metrics.observe_answer(model, chunk)
        for frame in writer.end(fin):
            yield frame

    return ChunkStreamingResponse(tool_frames() if plan is not None else frames(), stream,
                                  media_type=writer.media_type, headers=writer.headers)


async def _tool_final(ctx: ServerContext, request: Request, chat, writer, plan, text: str, last: Chunk,
                      verdicts: dict, *, model: str, extra: dict, t0: float, load_s: float, stream=None) -> Final:
    """An answer with tools as a ``Final``: its text and validated calls (a call cut off by the token limit
    is dropped), judged by the guard with the calls as the answer, finish_reason "tool_calls" with calls."""
    answer = stream.finish(last.finish_reason) if stream is not None else read_answer(plan, text, last.finish_reason)
    _, last = await _judged(ctx, request, chat, answer.judged_text(), last, verdicts)
    if last.finish_reason == "content_filter":
        fin = Final(model, last, "content_filter", "", extra=extra, total_s=time.perf_counter() - t0, load_s=load_s)
    else:
        fin = Final(model, last, "tool_calls" if answer.calls else finish(last), answer.content,
                    message=writer.tool_message(answer) if answer.calls else {}, extra=extra,
                    total_s=time.perf_counter() - t0, load_s=load_s)
    fin.answer = answer
    return fin
