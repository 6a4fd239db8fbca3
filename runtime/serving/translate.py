"""What both API families' requests share: the checked request (``Parsed``), the checks of its fields
(numbers, stop strings, model names, JSON schemas, the sampling options), and ``build_request``, which
makes the ``ChatRequest`` with its images. The families' own shapes live in openai_api.py and
ollama_api.py. No I/O here except decoding images (blocking; the app calls ``build_request`` off the
event loop).

Validation is by hand, not by a schema library: unknown fields are ignored (the ``openai`` SDK and
Open WebUI send fields we do not use), wrong types and values out of range are a 400 naming the
parameter, and features we do not have (tools, logprobs, n > 1) are refused rather than ignored.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from ..protocol import ChatRequest, Chunk, GenerationOptions, ImageInput, Message
from .apierror import APIError
from .settings import ServeSettings

KEEP = -1.0            # keep_alive: leave the model's setting as it is
KEEP_ALIVE_MAX = 1e9   # seconds; a longer keep_alive means forever (no clock arithmetic overflows)
MAX_SCHEMA_NODES = 2048  # objects and arrays in one JSON schema (checking 1,000 properties takes ~0.3 s)
MAX_STOP_CHARS = 1000
MAX_MODEL_CHARS = 512
DETAILS = ("auto", "low", "high")


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
    tool: dict = field(default_factory=dict)     # Message's tool fields (tool_calls, tool_call_id, name)


@dataclass
class Parsed:
    """A request, checked, before its images are decoded."""

    model: Optional[str]
    messages: list[RawMessage]
    options: GenerationOptions
    stream: bool
    include_usage: bool = False
    keep_alive_s: Optional[float] = KEEP
    tools: Optional[Any] = None      # tool_calls.ToolRequest

    @property
    def n_images(self) -> int:
        return sum(len(m.images) for m in self.messages)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------

def type_error(param: str, want: str) -> APIError:
    return APIError(400, f"`{param}` must be {want}.", param=param, code="invalid_type")


def number(body: dict, key: str, lo: float, hi: float, *, integer: bool = False, param: Optional[str] = None) -> Optional[float]:
    v = body.get(key)
    param = param or key
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise type_error(param, "an integer" if integer else "a number")
    if not lo <= v <= hi:
        raise APIError(400, f"`{param}` must be between {lo:g} and {hi:g} (got {v}).", param=param,
                       code="invalid_value")
    return v


def boolean(body: dict, key: str, default: bool, param: Optional[str] = None) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise type_error(param or key, "true or false")
    return v


def stop_strings(v: Any, param: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise type_error(param, "a string or a list of strings")
    if len(v) > 16 or any(len(s) > MAX_STOP_CHARS for s in v):
        raise APIError(400, f"`{param}` takes at most 16 strings of at most {MAX_STOP_CHARS} characters.",
                       param=param, code="invalid_value")
    return [s for s in v if s]


def model_name(body: dict) -> Optional[str]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise type_error("model", "a string")
    if model is not None and len(model) > MAX_MODEL_CHARS:       # (it is quoted back in a 404)
        raise APIError(400, f"`model` is longer than {MAX_MODEL_CHARS} characters.", param="model",
                       code="invalid_value")
    return model


def token_limit(v: Optional[float], param: str, settings: ServeSettings) -> int:
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
        raise type_error(param, "a JSON Schema object")
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


def sampling(body: dict, settings: ServeSettings, *, prefix: str = "") -> dict:
    """Sampling fields shared by OpenAI's body and Ollama's ``options`` (llama-server's extras too)."""
    out: dict = {}
    for key, lo, hi, integer in (("temperature", 0, 2, False), ("top_p", 0, 1, False), ("top_k", 0, 1 << 20, True),
                                 ("min_p", 0, 1, False), ("repeat_penalty", 0, 10, False),
                                 ("seed", -(1 << 63), (1 << 64) - 1, True)):
        v = number(body, key, lo, hi, integer=integer, param=prefix + key)
        if v is not None:
            out[key] = v
    if "seed" in out and out["seed"] < 0:          # llama.cpp's convention: -1 is "random"
        out["seed"] = None
    elif "seed" in out:
        out["seed"] = int(out["seed"]) & 0xFFFFFFFF
    out["draft"] = draft_mode(body, settings, prefix + "draft")
    return out


def draft_mode(body: dict, settings: ServeSettings, param: str) -> str:
    """``draft``: auto, off or ngram (generation/draft.py); absent: the server's --draft."""
    from ..generation.draft import DRAFT_MODES

    v = body.get("draft")
    if v is None:
        return settings.draft
    if not isinstance(v, str) or v.strip().lower() not in DRAFT_MODES:
        raise APIError(400, f"`{param}` must be one of {', '.join(DRAFT_MODES)}.", param=param, code="invalid_value")
    return v.strip().lower()


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def keep_alive(v: Any) -> Optional[float]:
    """Ollama's ``keep_alive``: seconds as a number, or "5m" / "1h" / "30s"; negative: forever (None)."""
    if v is None:
        return KEEP
    if isinstance(v, bool):
        raise type_error("keep_alive", "a duration (\"5m\") or a number of seconds")
    if isinstance(v, (int, float)):
        try:
            secs = float(v)
        except OverflowError:              # an integer of hundreds of digits: past any bound, i.e. forever
            return None
    elif isinstance(v, str) and _DURATION.match(v):
        num, unit = _DURATION.match(v).groups()
        secs = float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[unit]
    else:
        raise type_error("keep_alive", "a duration (\"5m\") or a number of seconds")
    if not math.isfinite(secs):
        raise APIError(400, "`keep_alive` must be a finite duration.", param="keep_alive", code="invalid_value")
    return None if secs < 0 or secs > KEEP_ALIVE_MAX else secs     # beyond ~31 years: forever, as Ollama


def finish(last: Chunk) -> str:
    """OpenAI's finish reasons: "length", "content_filter" (the guard withheld it), else "stop"."""
    return last.finish_reason if last.finish_reason in ("length", "content_filter") else "stop"


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
        messages.append(Message(m.role, m.text, imgs, **m.tool))
    details = [ref.detail for m in parsed.messages for ref in m.images if ref.detail]
    opts = parsed.options
    if details and _OPTIONS_HAVE_DETAIL:
        level = max(details, key=_DETAIL_ORDER.__getitem__)
        opts = replace(opts, image_detail=replace(opts.image_detail, level=level))
    return ChatRequest(messages=messages, options=opts)


def dumps(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
