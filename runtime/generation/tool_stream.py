"""Reading an answer with tools as it is written (``ToolPlan.stream()``): free text as it comes, each call
once it is complete and validated.

A call is held until its end has been written and its arguments validate (a call is short), then sent
whole: a call cut off by the token limit or one that does not validate is never sent, and neither is any
call after it, so a streamed answer ends exactly as the same answer read whole (``ToolPlan.read``).

The text is scanned incrementally: each piece resumes the search for the call marker and the JSON scanner
where the previous piece left them, so an answer costs time linear in its length.
"""
from __future__ import annotations

from typing import Optional

from .schema import SchemaViolation
from .tool_formats import _held_back, _json_calls


class ToolStream:
    """Turns an answer's text pieces into events: ("content", text), then for each validated call
    ("call", index, id, name) followed at once by ("arguments", index, its whole JSON text). ``finish``
    returns the whole ``ToolAnswer``, the calls carrying the ids the events did."""

    def __init__(self, plan) -> None:
        self.plan = plan
        fmt = plan.fmt
        self._trigger = fmt.trigger
        self._anchored = fmt.name == "llama3"          # the answer is a call only if it opens with "{"
        self._close = getattr(fmt, "close", None) if fmt.name == "lfm2" else None   # parsed whole at its end
        self._parts: list[str] = []
        self._text = ""
        self._content = 0               # characters of content sent
        self._searched = 0              # the trigger is not in text[:_searched]
        self.begun: Optional[int] = None    # where the first call's marker starts
        self._pos = 0                   # the JSON scanner: next character, depth, in a string, escaped
        self._depth, self._in_str, self._esc, self._obj = 0, False, False, -1
        self._done = False              # no more calls will be sent (one was cut off, invalid, or the last)
        self._ids: list[str] = []

    @property
    def text(self) -> str:
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    def feed(self, piece: str) -> list[tuple]:
        if not self.plan.constrained:
            self._parts.append(piece)
            return [("content", piece)] if piece else []
        if not piece:
            return []
        text = self._text = self.text + piece
        events: list[tuple] = []
        if self.begun is None:
            self._find_trigger(text)
            end = self.begun if self.begun is not None else (
                len(text) if self._anchored else len(text) - _held_back(text, self._trigger))
            if end > self._content and not (self.begun is not None and not text[self._content:end].strip()):
                events.append(("content", text[self._content:end]))
                self._content = end
            if self.begun is None:
                return events
            self._pos = self.begun
        if not self._done:
            events += self._calls(text)
        return events

    def _find_trigger(self, text: str) -> None:
        if self._anchored:
            if text.startswith("{"):
                self.begun = 0
            self._searched = len(text)
            return
        i = text.find(self._trigger, self._searched)
        if i >= 0:
            self.begun = i
        else:
            self._searched = max(0, len(text) - len(self._trigger) + 1)

    def _calls(self, text: str) -> list[tuple]:
        if self._close is not None:                    # LFM2: the whole list at once, when it is closed
            i = text.find(self._close, self._pos)
            if i < 0:
                self._pos = max(self.begun, len(text) - len(self._close) + 1)
                return []
            self._done = True
            _, raw, _ = self.plan.fmt.scan(text)
            return self._send(raw)
        events: list[tuple] = []
        depth, in_str, esc, obj, i, n = self._depth, self._in_str, self._esc, self._obj, self._pos, len(text)
        while i < n and not self._done:
            c = text[i]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif depth and c == '"':
                in_str = True
            elif c in "{[" and (depth or c == "{"):
                if depth == 0:
                    obj = i
                depth += 1
            elif c in "}]" and depth:
                depth -= 1
                if depth == 0:
                    raw = _json_calls(text[obj:i + 1], self.plan.fmt.args_key)[:1]
                    events += self._send(raw)
                    if self._anchored:
                        self._done = True
            i += 1
        self._depth, self._in_str, self._esc, self._obj, self._pos = depth, in_str, esc, obj, i
        return events

    def _send(self, raw) -> list[tuple]:
        events: list[tuple] = []
        for rc in raw:
            try:
                call = self.plan.validated(rc)
            except SchemaViolation:         # (tools.ToolCallViolation)
                self._done = True
                break
            k = len(self._ids)
            self._ids.append(call.id)
            events += [("call", k, call.id, call.name), ("arguments", k, call.arguments)]
        return events

    def finish(self, finish_reason: Optional[str]):
        """The whole answer (``ToolPlan.read``): the calls sent, with their ids."""
        answer = self.plan.read(self.text, finish_reason)
        for c, cid in zip(answer.calls, self._ids):
            c.id = cid
        return answer
