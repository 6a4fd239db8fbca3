"""How each model family writes a tool call: the grammar that constrains it and the parser that reads it.

Three syntaxes, chosen from the model's chat template (``detect``):

- ``hermes``: ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, one block per call
  (Qwen 2.5/3, SmolLM3, Hermes and other templates that write ``<tool_call>``); also the syntax of the
  generic preamble (``tools.PREAMBLE``) for templates without tool support.
- ``llama3``: the answer is one JSON object ``{"name": "f", "parameters": {...}}`` (Llama 3.1/3.2/3.3's
  JSON tool calling; their templates say so to the model). One call per answer.
- ``lfm2``: ``<|tool_call_start|>[f(a=1, b="x")]<|tool_call_end|>``, Pythonic calls (LFM2's templates).

The grammar is llguidance's Lark with the arguments as a ``%json`` subgrammar of that tool's own
parameter schema. Free text stays free until the call's opening marker (a lazy lexeme: once its marker has
been written the only way on is a complete, valid call); with ``tool_choice`` required or a named function
the grammar starts at the marker, so the call is forced from the first token.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

# What llguidance writes inside the calls: compact JSON apart from ", " and ": ", what json.dumps writes.
# Lenient, as --schema: keywords llguidance does not implement (uniqueItems, not) are left to jsonschema in parse.
_X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
MAX_PARALLEL = 8        # calls in one answer (bounds a small model that keeps calling)


@dataclass
class RawCall:
    """One call as written: its name, its arguments' JSON text (None until known), and whether it is complete."""

    name: Optional[str]
    arguments: Optional[str]
    complete: bool


def json_end(text: str, start: int) -> Optional[int]:
    """The index just past the JSON value (object or array) that starts at ``text[start]``, or None while it
    is incomplete. Strings and escapes are skipped, so braces inside them do not count."""
    depth, i, n, in_str = 0, start, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


class CallFormat:
    """A family's call syntax (see the module docstring)."""

    name = ""
    trigger = ""              # the text that opens the first call
    args_key = "arguments"
    parallel = True           # the syntax can carry several calls in one answer

    def call_schema(self, tool) -> dict:
        """The JSON object of one call to ``tool``, for the grammar (the schema the engine can compile)."""
        return {"type": "object", "properties": {"name": {"const": tool.name}, self.args_key: tool.engine_schema},
                "required": ["name", self.args_key], "additionalProperties": False}

    def _json_call(self, tools) -> str:
        one = [self.call_schema(t) for t in tools]
        schema = one[0] if len(one) == 1 else {"anyOf": one}
        return "%json " + json.dumps({**schema, "x-guidance": _X_GUIDANCE})

    def lark(self, tools, forced: bool, parallel: bool) -> str:
        raise NotImplementedError

    def scan(self, text: str) -> tuple[str, list[RawCall], bool]:
        """``text`` so far -> (the free text before the first call, safe to show; the calls begun; whether a
        call has begun, so that no more free text follows)."""
        raise NotImplementedError

    def write(self, name: str, arguments: dict) -> str:
        """One call in this syntax (assistant turns in a history rendered through the preamble)."""
        raise NotImplementedError


def _held_back(text: str, trigger: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``trigger`` (kept back from the
    free text until the next piece tells)."""
    for k in range(min(len(trigger) - 1, len(text)), 0, -1):
        if trigger.startswith(text[-k:]):
            return k
    return 0


def _json_calls(body: str, args_key: str) -> list[RawCall]:
    """The calls in ``body``: JSON objects ``{"name": ..., args_key: {...}}`` one after another, the last one
    possibly incomplete (its name and argument text as far as written)."""
    calls: list[RawCall] = []
    i = 0
    while True:
        j = body.find("{", i)
        if j < 0:
            return calls
        end = json_end(body, j)
        seg = body[j:end] if end is not None else body[j:]
        name = None
        key = '"name": "'
        k = seg.find(key)
        if k >= 0:
            q = seg.find('"', k + len(key))
            if q >= 0:
                name = seg[k + len(key):q]
        args = None
        ak = seg.find(f'"{args_key}": ')
        if ak >= 0:
            a0 = ak + len(args_key) + 4
            a_end = json_end(seg, a0) if a0 < len(seg) else None
            args = seg[a0:a_end] if a_end is not None else seg[a0:]
        calls.append(RawCall(name, args, end is not None))
        if end is None:
            return calls
        i = end


class Hermes(CallFormat):
    name = "hermes"
    trigger = "<tool_call>"
    close = "</tool_call>"

    def lark(self, tools, forced: bool, parallel: bool) -> str:
        more = f'("\\n<tool_call>" call){{0,{MAX_PARALLEL - 1}}}' if parallel else ""
        head = 'start: "<tool_call>" call ' + more if forced else \
            f'start: TEXT | pre call {more}\npre[lazy]: /(.|\\n)*<tool_call>/\nTEXT: /(.|\\n)*/'
        return f'%llguidance {{}}\n{head}\ncall: "\\n" {self._json_call(tools)} "\\n</tool_call>"\n'

    def scan(self, text: str) -> tuple[str, list[RawCall], bool]:
        i = text.find(self.trigger)
        if i < 0:
            return text[:len(text) - _held_back(text, self.trigger)], [], False
        return text[:i], _json_calls(text[i:], self.args_key), True

    def write(self, name: str, arguments: dict) -> str:
        return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}\n</tool_call>'


class Llama3(CallFormat):
    name = "llama3"
    trigger = "{"
    args_key = "parameters"
    parallel = False

    def lark(self, tools, forced: bool, parallel: bool) -> str:
        head = "start: call" if forced else "start: call | TEXT\nTEXT: /([^{](.|\\n)*)?/"
        return f"%llguidance {{}}\n{head}\ncall: {self._json_call(tools)}\n"

    def scan(self, text: str) -> tuple[str, list[RawCall], bool]:
        if not text.startswith("{"):
            return text, [], False
        return "", _json_calls(text, self.args_key)[:1], True

    def write(self, name: str, arguments: dict) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


_CALL_NAME = re.compile(r"\s*([A-Za-z0-9_-]+)\(")
_KEY = re.compile(r"\s*([^=\s,()]+)\s*=\s*")
_ARG_NAME = re.compile(r"[^=\s,()]+\Z")
_PY_WORDS = {"True": True, "False": False, "None": None}


def _pythonic(body: str) -> list[tuple[str, dict]]:
    """``[f(a=1, b="x"), g()]`` -> [(name, arguments)]. Values are JSON (what the grammar writes), or
    Python's True/False/None; names may hold "-" (OpenAI allows it), so this is not Python's own parser."""
    dec = json.JSONDecoder()
    i = body.index("[") + 1
    calls = []
    while True:
        m = _CALL_NAME.match(body, i)
        if not m:
            raise ValueError(f"no call at {body[i:i + 20]!r}")
        name, i, args = m.group(1), m.end(), {}
        while True:
            while body[i:i + 1].isspace():
                i += 1
            if body[i:i + 1] == ")":
                i += 1
                break
            k = _KEY.match(body, i)
            if not k:
                raise ValueError(f"no argument at {body[i:i + 20]!r}")
            i = k.end()
            word = next((w for w in _PY_WORDS if body.startswith(w, i)), None)
            if word:
                args[k.group(1)], i = _PY_WORDS[word], i + len(word)
            else:
                args[k.group(1)], i = dec.raw_decode(body, i)
            while body[i:i + 1].isspace():
                i += 1
            if body[i:i + 1] == ",":
                i += 1
        calls.append((name, args))
        while body[i:i + 1].isspace():
            i += 1
        if body[i:i + 1] == ",":
            i += 1
            continue
        if body[i:i + 1] == "]":
            return calls
        raise ValueError(f"unexpected {body[i:i + 20]!r}")


class Lfm2(CallFormat):
    """LFM2's Pythonic calls. Each argument's value is written as JSON (``%json`` of its own schema), which
    is a Python literal too, apart from true/false/null, which the parser reads."""

    name = "lfm2"
    trigger = "<|tool_call_start|>"
    close = "<|tool_call_end|>"

    def _call_rule(self, tool) -> str:
        props = tool.engine_schema.get("properties") or {}
        required = [k for k in tool.engine_schema.get("required", []) if k in props]
        optional = [k for k in props if k not in required]

        def arg(k):
            sub = props[k] if isinstance(props[k], dict) else {}
            return f'{json.dumps(k + "=", ensure_ascii=False)} %json {json.dumps({**sub, "x-guidance": _X_GUIDANCE})}'

        def tail(keys):   # each optional argument after the first present one, in order, with its separator
            return " ".join(f'(", " {arg(k)})?' for k in keys)

        if required:
            body = " ".join([arg(required[0])] + [f'", " {arg(k)}' for k in required[1:]]) + " " + tail(optional)
        elif optional:
            body = "(" + " | ".join(f"{arg(k)} {tail(optional[i + 1:])}" for i, k in enumerate(optional)) + ")?"
        else:
            body = ""
        return f'"{tool.name}(" {body} ")"'

    def unwritable(self, tool) -> Optional[str]:
        """A parameter name this syntax cannot carry (``name=value``: no space, =, comma, parenthesis)."""
        return next((k for k in (tool.engine_schema.get("properties") or {}) if not _ARG_NAME.match(k)), None)

    def lark(self, tools, forced: bool, parallel: bool) -> str:
        alts = " | ".join(f"call_{i}" for i in range(len(tools)))
        rules = "\n".join(f"call_{i}: {self._call_rule(t)}" for i, t in enumerate(tools))
        more = f'(", " call){{0,{MAX_PARALLEL - 1}}}' if parallel else ""
        calls = f'"[" call {more} "]" "{self.close}"'
        head = f'start: "{self.trigger}" {calls}' if forced else \
            f'start: TEXT | pre {calls}\npre[lazy]: /(.|\\n)*<\\|tool_call_start\\|>/\nTEXT: /(.|\\n)*/'
        return f"%llguidance {{}}\n{head}\ncall: {alts}\n{rules}\n"

    def scan(self, text: str) -> tuple[str, list[RawCall], bool]:
        i = text.find(self.trigger)
        if i < 0:
            return text[:len(text) - _held_back(text, self.trigger)], [], False
        body = text[i + len(self.trigger):]
        end = body.find(self.close)
        if end < 0:
            return text[:i], [], True      # written whole at the end: a Python call is parsed when complete
        try:
            calls = [RawCall(n, json.dumps(a, ensure_ascii=False), True) for n, a in _pythonic(body[:end])]
        except (ValueError, RecursionError) as e:
            return text[:i], [RawCall(None, f"<unparsable: {str(e)[:60]}>", False)], True
        return text[:i], calls, True

    def write(self, name: str, arguments: dict) -> str:
        args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
        return f"{self.trigger}[{name}({args})]{self.close}"


FORMATS = {f.name: f for f in (Hermes(), Llama3(), Lfm2())}


def detect(template: Optional[str], probe) -> tuple[CallFormat, bool]:
    """(the call syntax, whether the template renders tools itself) for a chat template. ``probe(tools)``
    renders a fixed conversation with those tools (None on a template error): the template is native when
    a probe tool's name appears in its rendering and its call syntax is one we know."""
    if not template:
        return FORMATS["hermes"], False
    if any(x in template for x in ("<|tool_call_start|>", "<|tool_list_start|>", "List of tools: [")):
        fmt = FORMATS["lfm2"]
    elif "<tool_call>" in template and "arguments" in template and not any(
            x in template for x in ("<function=", "<arg_key>", "<parameter=")):
        fmt = FORMATS["hermes"]                     # Qwen, Hermes, Granite 4: JSON inside <tool_call>
    elif "<|start_header_id|>" in template and "ipython" in template and "parameters" in template:
        fmt = FORMATS["llama3"]                     # Llama 3.1 / 3.2 / 3.3
    else:
        return FORMATS["hermes"], False
    name = "probe_fn_7f3a"
    with_tools = probe([{"type": "function", "function": {"name": name, "description": "probe",
                                                          "parameters": {"type": "object", "properties": {}}}}])
    if not with_tools or name not in with_tools:
        return FORMATS["hermes"], False
    return fmt, True
