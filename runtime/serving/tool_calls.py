"""Tool calling in `vlm serve`, for both API families: the request's ``tools``, ``tool_choice`` and
``parallel_tool_calls`` checked before anything runs (a bad tool list is a 400), a history's calls and tool
results read into ``Message``s, the plan made once the model (its template) is known, and the answer read
back as text and calls (generation/tools.py does the work; docs/tools.md has the shapes)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from .apierror import APIError, bad_request
from .bodies import MAX_DEPTH, check_tree
from .translate import boolean, type_error


@dataclass
class ToolRequest:
    tools: tuple                  # generation.tools.Tool
    choice: Any                   # OpenAI's tool_choice, checked
    parallel: bool


def parse_tools(body: dict, *, ollama: bool = False) -> Optional[ToolRequest]:
    """The request's tools (None without any: an empty list is none, as llama-server and Ollama take it)."""
    from ..generation.tools import ToolListError, check_choice, check_tools

    raw = body.get("tools")
    if raw is None or raw == []:
        if not ollama and body.get("tool_choice") not in (None, "none", "auto"):
            raise bad_request("`tool_choice` needs `tools`.", "tool_choice")
        return None
    try:
        tools = check_tools(raw)
        choice = None if ollama else body.get("tool_choice")
        check_choice(choice, tools)
    except ToolListError as e:
        raise APIError(400, e.message, param=e.param, code="invalid_tools") from None
    return ToolRequest(tools, choice, True if ollama else boolean(body, "parallel_tool_calls", True))


def history_fields(m: dict, mi: int, role: str, ids: dict, *, ollama: bool = False) -> dict:
    """An assistant message's ``tool_calls`` (OpenAI's: arguments a JSON string; Ollama's: an object) and a
    tool message's ``tool_call_id`` / name, as ``Message`` fields in OpenAI's shape. ``ids`` maps the call
    ids seen so far to their function names (a tool message names its call by id only)."""
    p = f"messages[{mi}]"
    out: dict = {}
    if role == "assistant" and m.get("tool_calls") is not None:
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise type_error(f"{p}.tool_calls", "a list of calls")
        norm = []
        for ci, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise type_error(f"{p}.tool_calls[{ci}]", 'an object {"function": {"name": ..., "arguments": ...}}')
            args = fn.get("arguments", {} if ollama else "{}")
            if isinstance(args, dict):
                args = json.dumps(args, ensure_ascii=False)
            elif not isinstance(args, str):
                raise type_error(f"{p}.tool_calls[{ci}].function.arguments", "a JSON string" if not ollama else "an object")
            else:
                _check_arguments(args, f"{p}.tool_calls[{ci}].function.arguments")
            cid = c.get("id") if isinstance(c.get("id"), str) else f"call_{mi}_{ci}"
            ids[cid] = fn["name"]
            norm.append({"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = norm
    if role == "tool":
        cid = m.get("tool_call_id")
        if cid is not None and not isinstance(cid, str):
            raise type_error(f"{p}.tool_call_id", "a string")
        name = m.get("tool_name") or m.get("name") or ids.get(cid)
        if name is not None and not isinstance(name, str):
            raise type_error(f"{p}.name", "a string")
        out.update(tool_call_id=cid or "", name=name or "")
    return out


def _check_arguments(text: str, param: str) -> None:
    """A history's arguments string nested no deeper than a request body may be (400): every later walk of
    it (the prompt, the template) is then safe. Text that is not JSON is kept as text."""
    try:
        doc = json.loads(text)
    except RecursionError:
        doc = None
        deep = True
    except ValueError:
        return
    else:
        deep = False
        if isinstance(doc, (dict, list)):
            try:
                check_tree(doc)
            except APIError:
                deep = True
    if deep:
        raise APIError(400, f"`{param}` is nested too deeply (more than {MAX_DEPTH} levels); flatten it.",
                       param=param, code="invalid_value")


def plan_for(tool_request: ToolRequest, backend, chat):
    """(the plan, the request rewritten for it: tools in the template or the preamble, the constraint)."""
    from ..generation.tools import ToolListError, plan_tools

    try:
        plan = plan_tools(backend, tool_request.tools, tool_request.choice, parallel=tool_request.parallel,
                          raw=bool(chat.options.raw))
    except ToolListError as e:          # (a parameter name the model's call syntax cannot carry)
        raise APIError(400, e.message, param=e.param, code="invalid_tools") from None
    return plan, plan.request(chat.messages, chat.options)


def read_answer(plan, text: str, finish_reason: Optional[str]):
    """The answer as text and validated calls (``ToolPlan.read``): a call that is cut off by the token limit
    or does not validate is never returned, nor any call after it; the text before the calls is the answer."""
    return plan.read(text, finish_reason)


def openai_message(answer) -> dict:
    return {"content": answer.content or None, "tool_calls": [c.openai() for c in answer.calls]}


def ollama_message(answer) -> dict:
    return {"tool_calls": [{"function": {"index": i, "name": c.name, "arguments": c.args}}
                           for i, c in enumerate(answer.calls)]}
