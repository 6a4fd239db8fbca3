"""OpenAI's Chat Completions (and /v1/models): the request's shape in (``parse_openai``), the answer's
out (``OpenAIWriter``: one JSON object, or server-sent events), and the handlers. The answer itself
comes from the one answer path (answer.py).
"""
from __future__ import annotations

import secrets
import time
from typing import Any, Iterable, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..protocol import Chunk, GenerationOptions
from .answer import Final, Frame, answer
from .apierror import APIError, bad_request
from .context import endpoint, installed, mtime, read_body, server
from .settings import ServeSettings
from .tool_calls import history_fields, openai_message, parse_tools
from .translate import (DETAILS, ImageRef, Parsed, RawMessage, boolean, check_schema, dumps, model_name, number,
                        sampling, stop_strings, token_limit, type_error)


# --------------------------------------------------------------------------------------------
# the request
# --------------------------------------------------------------------------------------------

def _openai_content(content: Any, mi: int, role: str) -> tuple[str, list[ImageRef]]:
    param = f"messages[{mi}].content"
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise type_error(param, "a string or a list of content parts")
    texts: list[str] = []
    images: list[ImageRef] = []
    for pi, part in enumerate(content):
        pp = f"{param}[{pi}]"
        if not isinstance(part, dict):
            raise type_error(pp, "an object with a `type`")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            t = part.get("text")
            if not isinstance(t, str):
                raise type_error(f"{pp}.text", "a string")
            texts.append(t)
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{pp}: images are allowed in user messages only.", pp)
            iu = part.get("image_url")
            if isinstance(iu, str):
                url, detail = iu, None
            elif isinstance(iu, dict):
                url, detail = iu.get("url"), iu.get("detail")
            else:
                raise type_error(f"{pp}.image_url", "an object with a `url`")
            if not isinstance(url, str) or not url:
                raise type_error(f"{pp}.image_url.url", "a non-empty string")
            if detail is not None and detail not in DETAILS:
                raise APIError(400, f"`{pp}.image_url.detail` must be one of {', '.join(DETAILS)}.",
                               param=f"{pp}.image_url.detail", code="invalid_value")
            images.append(ImageRef(url, f"{pp}.image_url", detail))
        else:
            raise APIError(400, f"`{pp}.type` `{kind}` is not supported (text and image_url are).", param=f"{pp}.type",
                           code="unsupported_content")
    return "\n".join(texts), images


def _response_format(body: dict) -> Optional[dict]:
    """OpenAI's nested ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
    llama-server's flat ``{"type": "json_object"|"json_schema", "schema": {...}}``, ``json_object`` alone
    (any JSON object), and llama-server's top-level ``json_schema``."""
    rf = body.get("response_format")
    if rf is None:
        top = body.get("json_schema")
        return check_schema(top, "json_schema") if top is not None else None
    if not isinstance(rf, dict):
        raise type_error("response_format", "an object with a `type`")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise APIError(400, "`response_format.type` must be text, json_object or json_schema.",
                       param="response_format.type", code="invalid_value")
    if isinstance(rf.get("json_schema"), dict):
        js = rf["json_schema"]
        schema = js.get("schema")
        if schema is None:
            raise bad_request("`response_format.json_schema.schema` is required.", "response_format.json_schema.schema")
        return check_schema(schema, "response_format.json_schema.schema")
    if rf.get("schema") is not None:
        return check_schema(rf["schema"], "response_format.schema")
    if kind == "json_schema":
        raise bad_request("`response_format.json_schema` is required for type json_schema.", "response_format.json_schema")
    return {"type": "object"}


def parse_openai(body: Any, settings: ServeSettings) -> Parsed:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = model_name(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("`messages` must be a non-empty list.", "messages")
    tools = parse_tools(body)          # a bad tool list is a 400 before anything runs
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("logprobs are not supported by this server.", "logprobs")
    n = number(body, "n", 1, 1, integer=True)
    del n
    out: list[RawMessage] = []
    ids: dict = {}
    for mi, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise type_error(f"messages[{mi}]", "an object with `role` and `content`")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"`messages[{mi}].role` must be system, developer, user, assistant or tool "
                                f"(got {role!r}).", param=f"messages[{mi}].role", code="invalid_value")
        text, images = _openai_content(m.get("content"), mi, role)
        out.append(RawMessage(role, text, images, history_fields(m, mi, role, ids)))
    mt = number(body, "max_completion_tokens", 1, 1 << 31, integer=True)
    if mt is None:
        mt = number(body, "max_tokens", 1, 1 << 31, integer=True)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise type_error("stream_options", "an object")
    stream = boolean(body, "stream", False)
    opts = GenerationOptions(max_tokens=token_limit(mt, "max_tokens", settings), stop=stop_strings(body.get("stop"), "stop"),
                             json_schema=_response_format(body), **sampling(body, settings))
    if tools is not None and opts.json_schema is not None:
        raise bad_request("`tools` and `response_format` cannot be used together.", "response_format")
    return Parsed(model=model, messages=out, options=opts, stream=stream,
                  include_usage=bool(so and boolean(so, "include_usage", False, "stream_options.include_usage")),
                  tools=tools)



# --------------------------------------------------------------------------------------------
# the answer
# --------------------------------------------------------------------------------------------

def openai_usage(last: Chunk) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": max(0, last.prompt_tokens - last.prompt_eval_tokens)}}


def timings(last: Chunk) -> dict:
    """llama-server's ``timings`` object (its names), plus the image encode and the TTFT."""
    pn, pms = last.prompt_eval_tokens, last.prefill_s * 1000
    dn, dms = max(0, last.completion_tokens - 1), last.decode_s * 1000
    return {"cache_n": max(0, last.prompt_tokens - last.prompt_eval_tokens),
            "prompt_n": pn, "prompt_ms": round(pms, 3),
            "prompt_per_token_ms": round(pms / pn, 3) if pn else None,
            "prompt_per_second": round(pn / last.prefill_s, 2) if last.prefill_s > 0 and pn else None,
            "predicted_n": last.completion_tokens, "predicted_ms": round(dms, 3),
            "predicted_per_token_ms": round(dms / dn, 3) if dn else None,
            "predicted_per_second": round(dn / last.decode_s, 2) if last.decode_s > 0 and dn else None,
            "image_tokens": last.image_tokens, "image_encode_ms": round(last.image_encode_s * 1000, 3),
            "ttft_ms": round(last.ttft_s * 1000, 3)}


def openai_completion(rid: str, created: int, final: Final) -> dict:
    last = final.last
    return {"id": rid, "object": "chat.completion", "created": created, "model": final.model,
            "system_fingerprint": "edgevlm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text, **final.message},
                         "logprobs": None, "finish_reason": final.finish_reason}],
            "usage": openai_usage(last), "timings": timings(last)}


def openai_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: Optional[str] = None, **extra) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "edgevlm",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


def openai_content_frames(rid: str, model: str, created: int):
    """A function text -> the SSE event ``data: <openai_chunk(rid, model, created, {"content": text})>``
    as bytes, byte for byte what ``dumps`` gives, with the JSON around the text rendered once per answer:
    per streamed token only the text is encoded (a dict built and dumped per token was ~15% of the event
    loop's work per token)."""
    from json.encoder import encode_basestring       # what json.dumps uses for a str (ensure_ascii=False)

    mark = "\x00edgevlm\x00"                         # rendered as \u0000edgevlm\u0000: in no id or model name
    head, sep, tail = f"data: {dumps(openai_chunk(rid, model, created, {'content': mark}))}\n\n".partition(
        encode_basestring(mark))
    assert sep and encode_basestring(mark) not in tail
    head_b, tail_b = head.encode(), tail.encode()
    return lambda text: b"".join((head_b, encode_basestring(text).encode(), tail_b))


def openai_usage_chunk(rid: str, model: str, created: int, last: Chunk) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "edgevlm", "choices": [], "usage": openai_usage(last)}


class OpenAIWriter:
    """An answer in OpenAI's shapes: a ``chat.completion`` object, or ``chat.completion.chunk`` events
    (the role first, then the text, then anything else of the message (``Final.message``), the finish
    reason with llama-server's timings, the usage when asked for, and ``[DONE]``)."""

    media_type = "text/event-stream"
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    streams_guarded = True

    def __init__(self, parsed: Parsed):
        self.include_usage = parsed.include_usage
        self.rid, self.created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        self.model = ""
        self._content = None

    def whole(self, final: Final) -> dict:
        return {**openai_completion(self.rid, self.created, final), **final.extra}

    def start(self, model: str) -> Iterable[Frame]:
        self.model = model
        self._content = openai_content_frames(self.rid, model, self.created)
        return [f"data: {dumps(openai_chunk(self.rid, model, self.created, {'role': 'assistant', 'content': ''}))}\n\n"]

    def text(self, piece: str) -> Frame:
        return self._content(piece)

    def tool_message(self, answer) -> dict:
        return openai_message(answer)

    def tool_delta(self, event: tuple) -> Frame:
        """One event of a streamed call (generation.tools.ToolStream) as a ``delta.tool_calls`` chunk: the
        call's index, id, type and name first, then its arguments in fragments (what the openai SDK joins)."""
        if event[0] == "call":
            _, i, cid, name = event
            call = {"index": i, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
        else:
            _, i, fragment = event
            call = {"index": i, "function": {"arguments": fragment}}
        return f"data: {dumps(openai_chunk(self.rid, self.model, self.created, {'tool_calls': [call]}))}\n\n"

    def end(self, final: Final) -> Iterable[Frame]:
        rid, model, created = self.rid, self.model, self.created
        if final.message:
            yield f"data: {dumps(openai_chunk(rid, model, created, final.message))}\n\n"
        yield (f"data: {dumps(openai_chunk(rid, model, created, {}, final.finish_reason, timings=timings(final.last), **final.extra))}"
               "\n\n")
        if self.include_usage:
            yield f"data: {dumps(openai_usage_chunk(rid, model, created, final.last))}\n\n"
        yield "data: [DONE]\n\n"

    def failed(self, err: APIError) -> Frame:
        return f"data: {dumps(err.openai_body())}\n\n"


# --------------------------------------------------------------------------------------------
# the handlers
# --------------------------------------------------------------------------------------------

@endpoint("chat_completions")
async def chat_completions(request: Request) -> Response:
    parsed = await read_body(request, parse_openai)
    return await answer(request, parsed, OpenAIWriter(parsed))


def _model_doc(mid: str, created: int, loaded: bool) -> dict:
    return {"id": mid, "object": "model", "created": created, "owned_by": "edgevlm", "loaded": loaded}


@endpoint("models")
async def list_models(request: Request) -> Response:
    data = [_model_doc(m["id"], mtime(m["path"]), m["loaded"]) for m in installed(server(request))]
    return JSONResponse({"object": "list", "data": data})


@endpoint("models")
async def get_model(request: Request) -> Response:
    pool = server(request).pool
    r = pool.resolve(request.path_params["model"])
    return JSONResponse(_model_doc(pool.model_id(r), mtime(r.artifact.path),
                                   any(e.id == pool.model_id(r) for e in pool.loaded())))


# (path, handler, methods): app.py mounts them
ROUTES = [
    ("/v1/chat/completions", chat_completions, ["POST"]),
    ("/chat/completions", chat_completions, ["POST"]),
    ("/v1/models", list_models, ["GET"]),
    ("/v1/models/{model:path}", get_model, ["GET"]),
]
