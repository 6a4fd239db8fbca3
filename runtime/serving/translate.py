"""Request and response shapes: OpenAI Chat Completions and Ollama's /api/chat and /api/generate in,
``ChatRequest`` out; ``Chunk``s in, their JSON out. No I/O here except decoding images (blocking; the
app calls ``build_request`` off the event loop).

Validation is by hand, not by a schema library: unknown fields are ignored (the ``openai`` SDK and
Open WebUI send fields we do not use), wrong types and values out of range are a 400 naming the
parameter, and features we do not have (tools, logprobs, n > 1) are refused rather than ignored.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from ..protocol import ChatRequest, Chunk, GenerationOptions, ImageInput, Message
from .apierror import APIError, bad_request
from .settings import ServeSettings

KEEP = -1.0            # keep_alive: leave the model's setting as it is
KEEP_ALIVE_MAX = 1e9   # seconds; a longer keep_alive means forever (no clock arithmetic overflows)
MAX_SCHEMA_NODES = 2048  # objects and arrays in one JSON schema (checking 1,000 properties takes ~0.3 s)
MAX_STOP_CHARS = 1000
MAX_MODEL_CHARS = 512
_DETAILS = ("auto", "low", "high")


@dataclass
class ImageRef:
    ref: str
    param: str
    detail: Optional[str] = None
    base64_only: bool = False


@dataclass
class RawMessage:
    role: str
    text: str
    images: list[ImageRef] = field(default_factory=list)


@dataclass
class Parsed:
    """A request, checked, before its images are decoded."""

    model: Optional[str]
    messages: list[RawMessage]
    options: GenerationOptions
    stream: bool
    include_usage: bool = False
    keep_alive_s: Optional[float] = KEEP

    @property
    def n_images(self) -> int:
        return sum(len(m.images) for m in self.messages)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

def _type_error(param: str, want: str) -> APIError:
    return APIError(400, f"`{param}` must be {want}.", param=param, code="invalid_type")


def _num(body: dict, key: str, lo: float, hi: float, *, integer: bool = False, param: Optional[str] = None) -> Optional[float]:
    v = body.get(key)
    param = param or key
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _type_error(param, "an integer" if integer else "a number")
    if not lo <= v <= hi:
        raise APIError(400, f"`{param}` must be between {lo:g} and {hi:g} (got {v}).", param=param,
                       code="invalid_value")
    return v


def _bool(body: dict, key: str, default: bool, param: Optional[str] = None) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(param or key, "true or false")
    return v


def _stop(v: Any, param: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _type_error(param, "a string or a list of strings")
    if len(v) > 16 or any(len(s) > MAX_STOP_CHARS for s in v):
        raise APIError(400, f"`{param}` takes at most 16 strings of at most {MAX_STOP_CHARS} characters.",
                       param=param, code="invalid_value")
    return [s for s in v if s]


def _model_name(body: dict) -> Optional[str]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string")
    if model is not None and len(model) > MAX_MODEL_CHARS:       # (it is quoted back in a 404)
        raise APIError(400, f"`model` is longer than {MAX_MODEL_CHARS} characters.", param="model",
                       code="invalid_value")
    return model


def _max_tokens(v: Optional[float], param: str, settings: ServeSettings) -> int:
    if v is None:
        return settings.max_tokens
    if v > settings.max_tokens:
        raise APIError(400, f"`{param}` is {int(v)}, above this server's limit of {settings.max_tokens}.",
                       param=param, code="invalid_value")
    return int(v)


def check_schema(schema: Any, param: str) -> dict:
    """A JSON schema the engine may compile: valid, at most ``MAX_SCHEMA_NODES`` objects and arrays (the
    body's depth limit bounds its nesting). Slow for big schemas: the app calls it off the event loop."""
    import jsonschema

    if not isinstance(schema, dict):
        raise _type_error(param, "a JSON Schema object")
    nodes, stack = 0, [schema]
    while stack:
        x = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise APIError(400, f"`{param}` is too large: more than {MAX_SCHEMA_NODES} objects and arrays.",
                           param=param, code="invalid_schema")
        stack.extend(v for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list)))
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(x) for x in e.absolute_path) or "(top level)"
        raise APIError(400, f"`{param}` is not a valid JSON Schema: {e.message} at {where}.", param=param,
                       code="invalid_schema") from None
    except RecursionError:
        raise APIError(400, f"`{param}` is nested too deeply.", param=param, code="invalid_schema") from None
    return schema


def _sampling(body: dict, settings: ServeSettings, *, prefix: str = "") -> dict:
    """Sampling fields shared by OpenAI's body and Ollama's ``options`` (llama-server's extras too)."""
    out: dict = {}
    for key, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False), ("top_k", 0, 1 << 20, True),
                                 ("min_p", 0, 1, False), ("repeat_penalty", 0, 10, False),
                                 ("seed", -(1 << 63), (1 << 64) - 1, True)):
        v = _num(body, key, lo, hi, integer=integer, param=prefix + key)
        if v is not None:
            out[key] = v
    if "seed" in out and out["seed"] < 0:          # llama.cpp's convention: -1 is "random"
        out["seed"] = None
    elif "seed" in out:
        out["seed"] = int(out["seed"]) & 0xFFFFFFFF
    return out


# --------------------------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------------------------

def _openai_content(content: Any, mi: int, role: str) -> tuple[str, list[ImageRef]]:
    param = f"messages[{mi}].content"
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _type_error(param, "a string or a list of content parts")
    texts: list[str] = []
    images: list[ImageRef] = []
    for pi, part in enumerate(content):
        pp = f"{param}[{pi}]"
        if not isinstance(part, dict):
            raise _type_error(pp, "an object with a `type`")
        kind = part.get("type")
        if kind in ("text", "input_text"):
            t = part.get("text")
            if not isinstance(t, str):
                raise _type_error(f"{pp}.text", "a string")
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
                raise _type_error(f"{pp}.image_url", "an object with a `url`")
            if not isinstance(url, str) or not url:
                raise _type_error(f"{pp}.image_url.url", "a non-empty string")
            if detail is not None and detail not in _DETAILS:
                raise APIError(400, f"`{pp}.image_url.detail` must be one of {', '.join(_DETAILS)}.",
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
        raise _type_error("response_format", "an object with a `type`")
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
    model = _model_name(body)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("`messages` must be a non-empty list.", "messages")
    if body.get("tools"):
        raise bad_request("Tool calling is not supported by this server.", "tools")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("logprobs are not supported by this server.", "logprobs")
    n = _num(body, "n", 1, 1, integer=True)
    del n
    out: list[RawMessage] = []
    for mi, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _type_error(f"messages[{mi}]", "an object with `role` and `content`")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"`messages[{mi}].role` must be system, developer, user or assistant (got {role!r}).",
                           param=f"messages[{mi}].role", code="invalid_value")
        text, images = _openai_content(m.get("content"), mi, role)
        out.append(RawMessage(role, text, images))
    mt = _num(body, "max_completion_tokens", 1, 1 << 31, integer=True)
    if mt is None:
        mt = _num(body, "max_tokens", 1, 1 << 31, integer=True)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _type_error("stream_options", "an object")
    stream = _bool(body, "stream", False)
    opts = GenerationOptions(max_tokens=_max_tokens(mt, "max_tokens", settings), stop=_stop(body.get("stop"), "stop"),
                             json_schema=_response_format(body), **_sampling(body, settings))
    return Parsed(model=model, messages=out, options=opts, stream=stream,
                  include_usage=bool(so and _bool(so, "include_usage", False, "stream_options.include_usage")))


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


def finish(last: Chunk) -> str:
    """OpenAI's finish reasons: "length", "content_filter" (the guard withheld it), else "stop"."""
    return last.finish_reason if last.finish_reason in ("length", "content_filter") else "stop"


def openai_completion(rid: str, model: str, created: int, text: str, last: Chunk) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": "edgevlm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish(last)}],
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


# --------------------------------------------------------------------------------------------
# Ollama
# --------------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def keep_alive(v: Any) -> Optional[float]:
    """Ollama's ``keep_alive``: seconds as a number, or "5m" / "1h" / "30s"; negative: forever (None)."""
    if v is None:
        return KEEP
    if isinstance(v, bool):
        raise _type_error("keep_alive", "a duration (\"5m\") or a number of seconds")
    if isinstance(v, (int, float)):
        try:
            secs = float(v)
        except OverflowError:              # an integer of hundreds of digits: past any bound, i.e. forever
            return None
    elif isinstance(v, str) and _DURATION.match(v):
        num, unit = _DURATION.match(v).groups()
        secs = float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[unit]
    else:
        raise _type_error("keep_alive", "a duration (\"5m\") or a number of seconds")
    if not math.isfinite(secs):
        raise APIError(400, "`keep_alive` must be a finite duration.", param="keep_alive", code="invalid_value")
    return None if secs < 0 or secs > KEEP_ALIVE_MAX else secs     # beyond ~31 years: forever, as Ollama


def _ollama_options(body: dict, settings: ServeSettings) -> GenerationOptions:
    o = body.get("options") or {}
    if not isinstance(o, dict):
        raise _type_error("options", "an object")
    np = _num(o, "num_predict", -2, 1 << 31, integer=True, param="options.num_predict")
    fmt = body.get("format")
    schema = None
    if fmt == "json":
        schema = {"type": "object"}
    elif isinstance(fmt, dict):
        schema = check_schema(fmt, "format")
    elif fmt not in (None, ""):
        raise _type_error("format", "\"json\" or a JSON Schema object")
    return GenerationOptions(max_tokens=_max_tokens(None if np is None or np <= 0 else np, "options.num_predict", settings),
                             stop=_stop(o.get("stop"), "options.stop"), json_schema=schema,
                             **_sampling(o, settings, prefix="options."))


def _ollama_images(v: Any, param: str) -> list[ImageRef]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _type_error(param, "a list of base64 strings")
    return [ImageRef(s, f"{param}[{i}]", base64_only=True) for i, s in enumerate(v)]


def _ollama_common(body: Any) -> str:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = _model_name(body)
    if not model:
        raise bad_request("`model` is required.", "model")
    if body.get("tools"):
        raise bad_request("Tool calling is not supported by this server.", "tools")
    return model


def parse_ollama_chat(body: Any, settings: ServeSettings) -> Parsed:
    model = _ollama_common(body)
    msgs = body.get("messages") or []
    if not isinstance(msgs, list):
        raise _type_error("messages", "a list")
    out = []
    for mi, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _type_error(f"messages[{mi}]", "an object with `role` and `content`")
        role, content = m.get("role"), m.get("content", "")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"`messages[{mi}].role` must be system, user or assistant.", param=f"messages[{mi}].role")
        if not isinstance(content, str):
            raise _type_error(f"messages[{mi}].content", "a string")
        out.append(RawMessage(role, content, _ollama_images(m.get("images"), f"messages[{mi}].images")))
    return Parsed(model=model, messages=out, options=_ollama_options(body, settings), stream=_bool(body, "stream", True),
                  keep_alive_s=keep_alive(body.get("keep_alive")))


def parse_ollama_generate(body: Any, settings: ServeSettings) -> Parsed:
    model = _ollama_common(body)
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str):
        raise _type_error("prompt", "a string")
    if system is not None and not isinstance(system, str):
        raise _type_error("system", "a string")
    if body.get("suffix"):
        raise bad_request("`suffix` (fill-in-the-middle) is not supported by this server.", "suffix")
    opts = _ollama_options(body, settings)
    opts.raw = _bool(body, "raw", False)
    msgs = [RawMessage("system", system)] if system else []
    if prompt or body.get("images"):
        msgs.append(RawMessage("user", prompt, _ollama_images(body.get("images"), "images")))
    return Parsed(model=model, messages=msgs, options=opts, stream=_bool(body, "stream", True),
                  keep_alive_s=keep_alive(body.get("keep_alive")))


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def ollama_final(model: str, last: Chunk, total_s: float, load_s: float, *, key: str) -> dict:
    ns = 1_000_000_000
    return {"model": model, "created_at": now_iso(), key: "" if key == "response" else {"role": "assistant", "content": ""},
            "done": True, "done_reason": finish(last), "total_duration": int(total_s * ns),
            "load_duration": int(load_s * ns), "prompt_eval_count": last.prompt_eval_tokens,
            "prompt_eval_duration": int(last.prefill_s * ns), "eval_count": last.completion_tokens,
            "eval_duration": int(last.decode_s * ns)}


def ollama_piece(model: str, text: str, *, key: str) -> dict:
    return {"model": model, "created_at": now_iso(),
            key: text if key == "response" else {"role": "assistant", "content": text}, "done": False}


# --------------------------------------------------------------------------------------------
# images -> ChatRequest
# --------------------------------------------------------------------------------------------

# The image path's detail levels live on GenerationOptions.image_detail (one level per request).
_OPTIONS_HAVE_DETAIL = "image_detail" in {f.name for f in fields(GenerationOptions)}
_DETAIL_ORDER = {"low": 0, "auto": 1, "high": 2}


def check_image_count(parsed: Parsed, settings: ServeSettings) -> None:
    if parsed.n_images > settings.max_images:
        raise APIError(400, f"The request has {parsed.n_images} images; this server takes at most {settings.max_images}.",
                       param="messages", code="too_many_images")


def build_request(parsed: Parsed, settings: ServeSettings, max_pixels: Optional[int],
                  images: Optional[list[list[ImageInput]]] = None) -> ChatRequest:
    """Assemble the ``ChatRequest``, with ``images`` (per message, decoded by ``workers.Workers.images``)
    or else decoding them here (blocking). OpenAI's per-image ``detail`` becomes the request's
    ``options.image_detail.level`` (the image path takes one level per request): the most detail any
    image asked for, so no image gets less than requested."""
    from .images import load_image_ref

    check_image_count(parsed, settings)
    messages = []
    for mi, m in enumerate(parsed.messages):
        imgs: list[ImageInput] = images[mi] if images is not None else [
            load_image_ref(ref.ref, settings, max_pixels, ref.param, base64_only=ref.base64_only) for ref in m.images]
        messages.append(Message(m.role, m.text, imgs))
    details = [ref.detail for m in parsed.messages for ref in m.images if ref.detail]
    opts = parsed.options
    if details and _OPTIONS_HAVE_DETAIL:
        level = max(details, key=_DETAIL_ORDER.__getitem__)
        opts = replace(opts, image_detail=replace(opts.image_detail, level=level))
    return ChatRequest(messages=messages, options=opts)


def dumps(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
