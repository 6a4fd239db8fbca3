"""Chat templates: render a conversation with the model's own Jinja template, sandboxed.

Images become the backend's media marker inside list-form content, which is what llama.cpp's
server does: the multimodal tokenizer then replaces each marker with the model's own image tokens.
"""
from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any, Optional

from ..errors import BackendError, TemplateRefused
from ..protocol import Message


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    import json

    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tool_fields(m: Message) -> dict[str, Any]:
    """An assistant turn's calls (arguments as an object, as templates expect) and a tool turn's ids."""
    import json

    out: dict[str, Any] = {}
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            fn = dict(c.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except (ValueError, RecursionError):
                    pass
            calls.append({**c, "function": fn, **fn})     # (some templates read tool_call.name directly)
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _as_template_messages(messages: list[Message], marker: str, list_form: bool) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        extra = _tool_fields(m) if (m.tool_calls or m.tool_call_id is not None or m.name is not None) else {}
        if extra:
            out.append({"role": m.role, "content": m.content, **extra})
        elif m.images and list_form:
            parts: list[dict[str, Any]] = []
            for img in m.images:
                if img.label:
                    parts.append({"type": "text", "text": img.label})
                parts.append({"type": "text", "text": marker})
            parts.append({"type": "text", "text": m.content})
            out.append({"role": m.role, "content": parts})
        elif m.images:
            prefix = "".join((f"{img.label}" if img.label else "") + marker for img in m.images)
            out.append({"role": m.role, "content": prefix + "\n" + m.content})
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def render_chat(template: str, messages: list[Message], *, bos_token: str, eos_token: str,
                marker: str = "<__media__>", add_generation_prompt: bool = True,
                tools: Optional[list[dict]] = None) -> str:
    """Render ``messages`` with ``template``. Tries list-form content for images, then string form.
    ``tools``: OpenAI's tool list for the template's ``tools`` variable (templates that support tools)."""
    import jinja2

    tmpl = _compile(template)
    has_images = any(m.images for m in messages)
    errors, refused = [], False
    for list_form in ((True, False) if has_images else (False,)):
        try:
            text = tmpl.render(
                messages=_as_template_messages(messages, marker, list_form),
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token, eos_token=eos_token,
                **({"tools": tools} if tools is not None else {}),
            )
        except jinja2.exceptions.TemplateError as e:
            errors.append(str(e))
            refused = True
            continue
        if has_images and text.count(marker) < sum(len(m.images) for m in messages):
            errors.append("the template dropped the images")
            continue
        return text
    raise (TemplateRefused if refused else BackendError)(
        f"The model's chat template could not render this conversation: {errors[-1]}",
        hint="Use --raw for plain completion, or a model whose template supports this input.",
    )
