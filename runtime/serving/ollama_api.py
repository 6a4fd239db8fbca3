"""Ollama's native API: /api/chat and /api/generate (their shapes in, ``OllamaWriter`` out: one JSON
object, or one object per line), and /api/tags, /api/ps, /api/version. The answer itself comes from the
one answer path (answer.py); a request with no prompt loads (or, keep_alive 0, unloads) the model, as
Ollama does.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..protocol import GenerationOptions
from .answer import Final, Frame, answer
from .apierror import APIError, bad_request
from .context import endpoint, installed, mtime, read_body, server
from .settings import ServeSettings
from .tool_calls import history_fields, ollama_message, parse_tools
from .translate import (ImageRef, Parsed, RawMessage, boolean, check_schema, dumps, keep_alive, model_name,
                        number, sampling, stop_strings, token_limit, type_error)

# --------------------------------------------------------------------------------------------
# the request
# --------------------------------------------------------------------------------------------

def _ollama_options(body: dict, settings: ServeSettings) -> GenerationOptions:
    o = body.get("options") or {}
    if not isinstance(o, dict):
        raise type_error("options", "an object")
    np = number(o, "num_predict", -2, 1 << 31, integer=True, param="options.num_predict")
    fmt = body.get("format")
    schema = None
    if fmt == "json":
        schema = {"type": "object"}
    elif isinstance(fmt, dict):
        schema = check_schema(fmt, "format")
    elif fmt not in (None, ""):
        raise type_error("format", "\"json\" or a JSON Schema object")
    return GenerationOptions(max_tokens=token_limit(None if np is None or np <= 0 else np, "options.num_predict", settings),
                             stop=stop_strings(o.get("stop"), "options.stop"), json_schema=schema,
                             **sampling(o, settings, prefix="options."))


def _ollama_images(v: Any, param: str) -> list[ImageRef]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise type_error(param, "a list of base64 strings")
    return [ImageRef(s, f"{param}[{i}]", base64_only=True) for i, s in enumerate(v)]


def _ollama_common(body: Any) -> str:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = model_name(body)
    if not model:
        raise bad_request("`model` is required.", "model")
    return model


def parse_ollama_chat(body: Any, settings: ServeSettings) -> Parsed:
    model = _ollama_common(body)
    msgs = body.get("messages") or []
    if not isinstance(msgs, list):
        raise type_error("messages", "a list")
    tools = parse_tools(body, ollama=True)         # a bad tool list is a 400 before anything runs
    out = []
    ids: dict = {}
    for mi, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise type_error(f"messages[{mi}]", "an object with `role` and `content`")
        role, content = m.get("role"), m.get("content", "")
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"`messages[{mi}].role` must be system, user, assistant or tool.", param=f"messages[{mi}].role")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise type_error(f"messages[{mi}].content", "a string")
        out.append(RawMessage(role, content, _ollama_images(m.get("images"), f"messages[{mi}].images"),
                              history_fields(m, mi, role, ids, ollama=True)))
    opts = _ollama_options(body, settings)
    if tools is not None and opts.json_schema is not None:
        raise bad_request("`tools` and `format` cannot be used together.", "format")
    return Parsed(model=model, messages=out, options=opts, stream=boolean(body, "stream", True),
                  keep_alive_s=keep_alive(body.get("keep_alive")), tools=tools)


def parse_ollama_generate(body: Any, settings: ServeSettings) -> Parsed:
    model = _ollama_common(body)
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str):
        raise type_error("prompt", "a string")
    if system is not None and not isinstance(system, str):
        raise type_error("system", "a string")
    if body.get("tools"):
        raise bad_request("Tool calling is on /api/chat, not /api/generate.", "tools")
    if body.get("suffix"):
        raise bad_request("`suffix` (fill-in-the-middle) is not supported by this server.", "suffix")
    opts = _ollama_options(body, settings)
    opts.raw = boolean(body, "raw", False)
    msgs = [RawMessage("system", system)] if system else []
    if prompt or body.get("images"):
        msgs.append(RawMessage("user", prompt, _ollama_images(body.get("images"), "images")))
    return Parsed(model=model, messages=msgs, options=opts, stream=boolean(body, "stream", True),
                  keep_alive_s=keep_alive(body.get("keep_alive")))


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"



# --------------------------------------------------------------------------------------------
# the answer
# --------------------------------------------------------------------------------------------

def ollama_final(final: Final, *, key: str) -> dict:
    """The last object of an answer (``done``: true) with Ollama's counts and durations; the text empty."""
    ns, last = 1_000_000_000, final.last
    return {"model": final.model, "created_at": now_iso(), key: _content(key, "", final.message),
            "done": True, "done_reason": final.finish_reason, "total_duration": int(final.total_s * ns),
            "load_duration": int(final.load_s * ns), "prompt_eval_count": last.prompt_eval_tokens,
            "prompt_eval_duration": int(last.prefill_s * ns), "eval_count": last.completion_tokens,
            "eval_duration": int(last.decode_s * ns)}


def _content(key: str, text: str, message: dict) -> Any:
    """/api/generate's ``response`` text, or /api/chat's assistant ``message`` (with ``Final.message``'s fields)."""
    return text if key == "response" else {"role": "assistant", "content": text, **message}


def ollama_piece(model: str, text: str, *, key: str) -> dict:
    return {"model": model, "created_at": now_iso(),
            key: text if key == "response" else {"role": "assistant", "content": text}, "done": False}


class OllamaWriter:
    """An answer in Ollama's shapes, under ``key`` (``message`` for /api/chat, ``response`` for
    /api/generate): one object, or newline-delimited objects ending with one that has ``done``: true.
    With the guard checking answers it answers whole, streaming asked or not."""

    media_type = "application/x-ndjson"
    headers: dict = {}
    streams_guarded = False

    def __init__(self, key: str):
        self.key = key
        self.model = ""

    def whole(self, final: Final) -> dict:
        doc = {**ollama_final(final, key=self.key), **final.extra}
        doc[self.key] = _content(self.key, final.text, final.message)
        return doc

    def start(self, model: str) -> Iterable[Frame]:
        self.model = model
        return ()

    def tool_message(self, answer) -> dict:
        return ollama_message(answer)

    def text(self, piece: str) -> Frame:
        return dumps(ollama_piece(self.model, piece, key=self.key)) + "\n"

    def end(self, final: Final) -> Iterable[Frame]:
        return (dumps(ollama_final(final, key=self.key)) + "\n",)

    def failed(self, err: APIError) -> Frame:
        return dumps(err.ollama_body()) + "\n"


# --------------------------------------------------------------------------------------------
# the handlers
# --------------------------------------------------------------------------------------------

async def _ollama(request: Request, parsed: Parsed, key: str) -> Response:
    if not any(m.role == "user" for m in parsed.messages):
        # Ollama's convention: no prompt loads the model (keep_alive 0: unloads it)
        pool = server(request).pool
        lease = await pool.acquire(parsed.model, parsed.keep_alive_s)
        model = request.scope["vlm.model"] = lease.entry.id
        lease.release()
        reason = "unload" if parsed.keep_alive_s == 0 else "load"
        if parsed.keep_alive_s == 0 and lease.entry.idle:
            pool.unload(lease.entry)
        doc = {"model": model, "created_at": now_iso(), key: _content(key, "", {}), "done": True,
               "done_reason": reason}
        return JSONResponse(doc)
    return await answer(request, parsed, OllamaWriter(key))


@endpoint("ollama_chat")
async def ollama_chat(request: Request) -> Response:
    return await _ollama(request, await read_body(request, parse_ollama_chat), "message")


@endpoint("ollama_generate")
async def ollama_generate(request: Request) -> Response:
    return await _ollama(request, await read_body(request, parse_ollama_generate), "response")


@endpoint("ollama_tags")
async def ollama_tags(request: Request) -> Response:
    out = []
    for m in installed(server(request)):
        files = (m.get("manifest") or {}).get("files") or []
        digest = next((f.get("sha256") for f in files if f.get("sha256")), "") or ""
        out.append({"name": m["id"], "model": m["id"],
                    "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime(m["path"]))),
                    "size": m["size"] or 0, "digest": digest,
                    "details": {"format": m["format"], "family": "", "families": None, "parameter_size": "",
                                "quantization_level": m["key"]}})
    return JSONResponse({"models": out})


@endpoint("ollama_ps")
async def ollama_ps(request: Request) -> Response:
    out = []
    for e in server(request).pool.loaded():
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


# (path, handler, methods): app.py mounts them
ROUTES = [
    ("/api/chat", ollama_chat, ["POST"]),
    ("/api/generate", ollama_generate, ["POST"]),
    ("/api/tags", ollama_tags, ["GET"]),
    ("/api/ps", ollama_ps, ["GET"]),
    ("/api/version", ollama_version, ["GET"]),
]
