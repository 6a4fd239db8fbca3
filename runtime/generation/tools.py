"""Tool calling: check a tool list, put it in the prompt, constrain the model's calls, read them back.

A caller (``vlm ask --tools``, ``vlm serve``) goes through four steps::

    tools = check_tools(raw)                          # OpenAI's tool list; ToolListError before anything loads
    plan = plan_tools(backend, tools, choice="auto")  # the model family's call syntax, from its template
    request = plan.request(messages, options)         # the prompt: the template's own tools, or the preamble
    answer = plan.parse(text, finish_reason)          # content and calls, each call's arguments validated

The guarantee: while the model writes a call, llguidance keeps it inside the family's call syntax, a declared
function name and that function's parameter schema (``tool_formats``); free text stays free until the model
opens a call, and ``tool_choice`` "required" or a named function forces a call from the first token. What
the engine could not enforce (a regex ``pattern``, ...) is caught by ``jsonschema`` in ``parse``: a call
that does not validate is never returned (``ToolCallViolation``). The grammar is compiled once per tool
set, choice and tokenizer (``_MATCHERS``); each answer starts from a copy of the compiled matcher.

Templates without tool support (and models without a template) get ``PREAMBLE`` in the system turn (the
first user turn when there is no template), in the ``hermes`` syntax; a history's calls and tool results
are written into the turns as text there. See docs/tools.md.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..errors import UsageError
from ..protocol import ChatRequest, GenerationOptions, Message
from .schema import SchemaViolation
from .tool_formats import FORMATS, CallFormat, RawCall, detect

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")     # OpenAI's rule for function names
MAX_TOOLS = 128
MAX_SCHEMA_NODES = 2048  # objects and arrays in all the tools' parameters together (as --schema's cap per schema)
CHOICES = ("auto", "none", "required")

PREAMBLE = """You can call functions. Here they are, in JSON Schema:
<tools>
{tools}
</tools>
{rule}
<tool_call>
{{"name": <function name>, "arguments": <its arguments as a JSON object>}}
</tool_call>"""
_RULES = {"auto": "To call one or more of them, answer with one block like this for each call; otherwise answer "
                  "in plain text:",
          "required": "Answer by calling one or more of them, one block like this for each call:",
          "function": "Answer by calling the function {name}, in a block like this:"}


class ToolListError(UsageError):
    """A tool list (or tool_choice) that cannot be used: not a list, a bad name, a duplicate, a parameter
    schema that is not JSON Schema. ``param`` names the offending field for an HTTP 400."""

    def __init__(self, message: str, param: str = "tools", hint: Optional[str] = None):
        super().__init__(message, hint=hint if hint is not None else
                         'A tool list is OpenAI\'s: [{"type": "function", "function": {"name": ..., "parameters": {...}}}].')
        self.param = param


class ToolCallViolation(SchemaViolation):
    """A call the model wrote that did not parse or validate (cut off by --max-tokens, or a keyword the
    engine could not enforce); never returned as a call."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict                 # the user's schema (what calls are validated against)
    engine_schema: dict              # what the grammar enforces (see _engine_schema)

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _fail(msg: str, param: str = "tools") -> ToolListError:
    return ToolListError(msg, param)


def check_tools(tools: Any, param: str = "tools") -> tuple[Tool, ...]:
    """OpenAI's tool list, checked: a non-empty list of ``{"type": "function", "function": {"name",
    "description"?, "parameters"?}}``, names unique and ``[A-Za-z0-9_-]{1,64}``, parameters a valid JSON
    Schema of an object (absent: no arguments). ``ToolListError`` naming the first problem."""
    import jsonschema

    if not isinstance(tools, list):
        raise _fail(f"`{param}` must be a list of tools, not {type(tools).__name__ if tools is not None else 'null'}.", param)
    if not tools:
        raise _fail(f"`{param}` is an empty list.", param)
    if len(tools) > MAX_TOOLS:
        raise _fail(f"`{param}` has {len(tools)} tools; at most {MAX_TOOLS} are allowed.", param)
    _check_size(tools, param)
    out: list[Tool] = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        p = f"{param}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict):
            raise _fail(f'`{p}` must be an object {{"type": "function", "function": {{...}}}}.', p)
        if t.get("type", "function") != "function":
            raise _fail(f"`{p}.type` must be \"function\" (got {str(t.get('type'))[:40]!r}).", f"{p}.type")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _fail(f"`{p}.function.name` must be 1 to 64 letters, digits, _ or - (got {str(name)[:70]!r}).",
                        f"{p}.function.name")
        if name in seen:
            raise _fail(f"`{p}.function.name`: two tools are named {name!r}.", f"{p}.function.name")
        seen.add(name)
        desc = f.get("description") or ""
        if not isinstance(desc, str):
            raise _fail(f"`{p}.function.description` must be a string.", f"{p}.function.description")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _fail(f"`{p}.function.parameters` must be a JSON Schema object.", f"{p}.function.parameters")
        try:
            jsonschema.validators.validator_for(params).check_schema(params)
        except jsonschema.SchemaError as e:
            where = "/".join(str(x) for x in e.absolute_path) or "(top level)"
            raise _fail(f"`{p}.function.parameters` is not a valid JSON Schema: {e.message} at {where}.",
                        f"{p}.function.parameters") from None
        except RecursionError:
            raise _fail(f"`{p}.function.parameters` is nested too deeply.", f"{p}.function.parameters") from None
        if params.get("type", "object") != "object":
            raise _fail(f"`{p}.function.parameters` must describe an object (\"type\": \"object\").",
                        f"{p}.function.parameters")
        out.append(Tool(name, desc, params, _engine_schema(params)))
    return tuple(out)


def _check_size(tools: list, param: str) -> None:
    """At most ``MAX_SCHEMA_NODES`` objects and arrays in the whole list, counted before any schema is checked
    (checking or compiling a huge schema costs seconds of CPU). Iterative: deep nesting cannot exhaust the stack."""
    nodes, stack = 0, [tools]
    while stack:
        x = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise _fail(f"`{param}` is too large: more than {MAX_SCHEMA_NODES} objects and arrays in the parameter "
                        "schemas together; send fewer or smaller tools.", param)
        stack.extend(v for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list)))


def load_tools(arg: str) -> tuple[Tool, ...]:
    """``--tools``: a path to a JSON file, or the JSON text itself."""
    from pathlib import Path

    text = arg
    if not arg.lstrip().startswith(("[", "{")):
        p = Path(arg).expanduser()
        if not p.is_file():
            raise ToolListError(f"--tools: no such file and not JSON: {arg[:60]}", "--tools",
                                hint="Pass a path to a .json file with OpenAI's tool list, or the list itself.")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ToolListError(f"--tools: cannot read {p}: {getattr(e, 'strerror', None) or e}", "--tools") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolListError(f"--tools is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.", "--tools") from e
    return check_tools(raw, "--tools")


def check_choice(choice: Any, tools: tuple[Tool, ...], param: str = "tool_choice") -> tuple[str, Optional[str]]:
    """OpenAI's ``tool_choice`` -> (mode, function name): "auto" | "none" | "required" | "function"."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise ToolListError(f"`{param}` must be auto, none, required or a function (got {choice[:40]!r}).", param)
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise ToolListError(f'`{param}` must be a string or {{"type": "function", "function": {{"name": ...}}}}.', param)
    if name not in {t.name for t in tools}:
        raise ToolListError(f"`{param}` names {name[:70]!r}, which is not in the tool list.", param)
    return "function", name


# --------------------------------------------------------------------------------------------------------
# the plan: syntax, prompt, grammar, reading the answer
# --------------------------------------------------------------------------------------------------------

@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str                   # JSON text, as written (what OpenAI's `function.arguments` carries)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    @property
    def args(self) -> dict:
        return json.loads(self.arguments)


@dataclass
class ToolAnswer:
    content: str                     # the free text (before the calls)
    calls: list[ToolCall] = field(default_factory=list)

    def judged_text(self) -> str:
        """What a safety filter (--guard) judges as the answer: the text, then each call as name(arguments)."""
        return "\n".join(([self.content] if self.content else []) + [f"{c.name}({c.arguments})" for c in self.calls])


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolPlan:
    """How one answer uses ``tools``: the call syntax, where the tools go in the prompt, the choice."""

    tools: tuple[Tool, ...]
    fmt: CallFormat
    native: bool                     # the template renders the tools itself (else: PREAMBLE)
    has_template: bool               # False: plain completion (no system turn; the preamble leads the prompt)
    mode: str = "auto"               # auto | none | required | function
    name: Optional[str] = None       # mode "function": the function
    parallel: bool = True
    system_turn: bool = True         # the template takes a system turn (Gemma's refuse one)

    @property
    def constrained(self) -> bool:
        return self.mode != "none"

    def offered(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.mode != "function" or t.name == self.name)

    def grammar(self) -> str:
        return self.fmt.lark(self.offered(), forced=self.mode in ("required", "function"),
                             parallel=self.parallel and self.fmt.parallel and self.mode != "function")

    def constraint(self, backend):
        """The constraint for one answer on ``backend`` (core.generate calls it): a copy of the matcher
        compiled once per grammar and tokenizer."""
        from .constrain import GrammarConstraint

        return _constraint(GrammarConstraint, backend.constraint_tokenizer(), self.grammar(), backend.eog_ids())

    # --- the prompt
    def request(self, messages: list[Message], options: GenerationOptions) -> ChatRequest:
        """The request for this answer: the tools in the template's own ``tools`` variable or in the preamble,
        the history's calls and results where the template or the preamble puts them, and the constraint."""
        opts = replace(options, tools=self if self.constrained else None, json_schema=None)
        if self.native:
            if self.fmt.name == "lfm2":     # LFM2's templates read a call from the assistant's text only
                messages = [replace(m, content="".join([m.content] + [
                    self.fmt.write((c.get("function") or {}).get("name", ""),
                                   _as_dict((c.get("function") or {}).get("arguments")))
                    for c in m.tool_calls]), tool_calls=[]) if m.tool_calls else m for m in messages]
            return ChatRequest(messages=list(messages), options=opts,
                               tools=[t.openai() for t in self.tools] if self.mode != "none" else None)
        msgs = self._as_text(messages)
        if self.mode != "none":
            msgs = self._with_preamble(msgs)
        return ChatRequest(messages=msgs, options=opts)

    def preamble(self) -> str:
        tools = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in self.offered())
        rule = _RULES["auto" if self.mode == "none" else self.mode].format(name=self.name)
        return PREAMBLE.format(tools=tools, rule=rule)

    def _with_preamble(self, msgs: list[Message]) -> list[Message]:
        text = self.preamble()
        if not self.has_template or not self.system_turn:   # the preamble leads the first user turn
            i = next((k for k, m in enumerate(msgs) if m.role == "user"), None)
            if i is not None:
                return msgs[:i] + [replace(msgs[i], content=text + "\n\n" + msgs[i].content)] + msgs[i + 1:]
            return [Message("user", text)] + msgs
        if msgs and msgs[0].role == "system":
            return [replace(msgs[0], content=msgs[0].content + "\n\n" + text)] + msgs[1:]
        return [Message("system", text)] + msgs

    def _as_text(self, messages: list[Message]) -> list[Message]:
        """A history for a template without tool support: calls become the assistant's text in this syntax,
        tool results a user turn of ``<tool_response>`` blocks (consecutive results in one turn)."""
        out: list[Message] = []
        for m in messages:
            if m.role == "assistant" and m.tool_calls:
                calls = []
                for c in m.tool_calls:
                    fn = c.get("function") or {}
                    calls.append(self.fmt.write(fn.get("name", ""), _as_dict(fn.get("arguments"))))
                text = "\n".join(([m.content] if m.content else []) + calls)
                out.append(Message("assistant", text, list(m.images)))
            elif m.role == "tool":
                block = "<tool_response>\n" + json.dumps({"name": m.name or "", "content": m.content},
                                                         ensure_ascii=False) + "\n</tool_response>"
                if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                    out[-1] = replace(out[-1], content=out[-1].content + "\n" + block)
                else:
                    out.append(Message("user", block))
            else:
                out.append(m)
        return out

    # --- the answer
    def parse(self, text: str, finish_reason: Optional[str] = None) -> ToolAnswer:
        """The answer's free text and its calls, each validated against its tool's parameters. A call cut
        off by the token limit is dropped when complete calls precede it; a call that is wrong in any other
        way raises ``ToolCallViolation`` (never returned)."""
        if not self.constrained:
            return ToolAnswer(text)
        content, raw, begun = self.fmt.scan(text)
        if not begun:
            content = text
        calls: list[ToolCall] = []
        for i, rc in enumerate(raw):
            if not rc.complete and finish_reason == "length":
                if calls:
                    break
                raise ToolCallViolation("The answer was cut off in the middle of a tool call.", hint="Raise --max-tokens.")
            calls.append(self.validated(rc))
        if begun and not calls:
            raise ToolCallViolation("The answer opened a tool call but did not write one.",
                                    hint="Raise --max-tokens." if finish_reason == "length" else "")
        return ToolAnswer(content.strip() if calls else content, calls)

    def validated(self, rc: RawCall) -> ToolCall:
        import jsonschema

        tools = {t.name: t for t in self.offered()}
        if not rc.complete or rc.name not in tools or rc.arguments is None:
            raise ToolCallViolation(f"The model wrote a tool call that does not parse ({str(rc.name)[:60]!r}).")
        try:
            args = json.loads(rc.arguments)
        except json.JSONDecodeError as e:
            raise ToolCallViolation(f"The arguments of {rc.name} are not JSON ({e.msg}).") from e
        except RecursionError:
            raise ToolCallViolation(f"The arguments of {rc.name} are nested too deeply.") from None
        try:
            jsonschema.validate(args, tools[rc.name].parameters)
        except RecursionError:
            raise ToolCallViolation(f"The arguments of {rc.name} are nested too deeply.") from None
        except jsonschema.ValidationError as e:
            raise ToolCallViolation(f"The arguments of {rc.name} do not match its parameters: {e.message}.",
                                    hint="The parameters use keywords that cannot be enforced while generating; "
                                         "simplify them, or try another --seed.") from e
        return ToolCall(new_call_id(), rc.name, rc.arguments)

    def read(self, text: str, finish_reason: Optional[str] = None) -> ToolAnswer:
        """The answer as ``vlm serve`` returns it, whole or streamed (never raises): the calls up to the first
        one that is cut off or does not validate, which is dropped with every call after it; the text
        before the calls is the content."""
        if not self.constrained:
            return ToolAnswer(text)
        content, raw, begun = self.fmt.scan(text)
        if not begun:
            return ToolAnswer(text)
        calls: list[ToolCall] = []
        for rc in raw:
            try:
                calls.append(self.validated(rc))
            except ToolCallViolation:
                break
        return ToolAnswer(content.strip(), calls)

    def stream(self):
        """A ``ToolStream`` reading this plan's answer as it is written (generation/tool_stream.py)."""
        from .tool_stream import ToolStream

        return ToolStream(self)


# --------------------------------------------------------------------------------------------------------
# building a plan; the compiled matchers
# --------------------------------------------------------------------------------------------------------

def plan_tools(backend, tools: tuple[Tool, ...], choice: Any = None, *, parallel: bool = True,
               param: str = "tool_choice", fmt: Optional[str] = None, raw: bool = False) -> ToolPlan:
    """The plan for ``tools`` on ``backend`` (its chat template decides the syntax; ``fmt`` forces one).
    ``raw`` (--raw, a completion-only model): the prompt is plain text, so planned as without a template
    (the preamble leads the first user turn, the history's calls and results are text)."""
    mode, name = check_choice(choice, tools, param)
    template = None if raw or getattr(backend, "chat_template", None) is None else backend.chat_template
    found, native = template_format(template)
    if fmt is not None:
        found, native = FORMATS[fmt], native and FORMATS[fmt] is found
    if found.name == "lfm2":
        for t in tools:
            bad = found.unwritable(t)
            if bad is not None:
                raise ToolListError(f"{t.name}: the parameter name {bad[:40]!r} cannot be written in this model's "
                                    "Pythonic calls (no spaces, =, commas or parentheses).",
                                    hint="Rename the parameter.")
    return ToolPlan(tools, found, native, bool(template), mode, name, parallel,
                    system_turn=bool(template) and _takes_system(template))


def _takes_system(template: str) -> bool:
    from .prompt import render_chat

    key = ("system", template)
    if key not in _DETECTED:
        try:
            _DETECTED[key] = "Xq7 rule" in render_chat(template, [Message("system", "Xq7 rule"), Message("user", "hi")],
                                                       bos_token="", eos_token="")
        except Exception:       # (a template that raises on a system turn)
            _DETECTED[key] = False
    return _DETECTED[key]


_DETECTED: dict = {}


def template_format(template: Optional[str]) -> tuple[CallFormat, bool]:
    """(call syntax, renders tools natively) for a chat template; cached per template."""
    if template in _DETECTED:
        return _DETECTED[template]

    def probe(tools):
        from .prompt import render_chat
        try:
            return render_chat(template, [Message("user", "hi")], bos_token="", eos_token="", tools=tools)
        except Exception:           # a template that cannot render the probe is not native
            return None

    found = detect(template, probe)
    if len(_DETECTED) > 32:
        _DETECTED.clear()
    _DETECTED[template] = found
    return found


def _as_dict(arguments: Any) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        v = json.loads(arguments) if isinstance(arguments, str) else {}
    except (ValueError, RecursionError):
        return {"arguments": arguments}
    return v if isinstance(v, dict) else {"arguments": v}


_SAFE_INT = 2 ** 53 - 1


def _engine_schema(params: dict) -> dict:
    """A tool's parameters as the grammar enforces them: unbounded integers get I-JSON's range (so a small
    model cannot repeat a digit to the token limit), regex ``pattern``s are dropped (validated after)."""
    from .constrain import _safe_integers, _simplified

    schema, _ = _simplified(_safe_integers(params), ref_siblings=False)
    if schema.get("type") is None:
        schema = {**schema, "type": "object"}
    return schema


_MATCHERS: dict = {}
_MATCHERS_MAX = 32


def _constraint(cls, ll_tokenizer, grammar: str, eos_ids):
    """A ``cls`` (GrammarConstraint) over a copy of the matcher compiled for (grammar, tokenizer)."""
    key = (grammar, id(ll_tokenizer))
    hit = _MATCHERS.get(key)
    if hit is None or hit[0] is not ll_tokenizer:
        from .constrain import import_llguidance

        llg = import_llguidance()
        try:
            compiled = llg.LLMatcher.grammar_from_lark(grammar)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(compiled, ll_tokenizer)
        except (ValueError, RuntimeError) as e:
            is_error, messages = True, [str(e)]
        if is_error:
            raise ToolListError("The tool list cannot be used to constrain the calls: "
                                + " ".join((messages[0] if messages else "invalid grammar").split())[:300],
                                hint="Simplify the parameter schemas.")
        if len(_MATCHERS) >= _MATCHERS_MAX:
            _MATCHERS.pop(next(iter(_MATCHERS)))
        proto = cls(ll_tokenizer, compiled, eos_ids)
        proto.what = "The tool list"
        _MATCHERS[key] = hit = (ll_tokenizer, proto)
    return hit[1].copy()


__all__ = ["Tool", "ToolCall", "ToolAnswer", "ToolPlan", "ToolListError", "ToolCallViolation",
           "check_tools", "load_tools", "check_choice", "plan_tools", "template_format", "PREAMBLE"]
