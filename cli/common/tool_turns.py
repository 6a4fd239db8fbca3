"""--tools in ask and chat: the earlier calls and their results a script passes back (--tool-calls,
--tool-result), what the guard judges for a call, and how a call is shown. The exit code of an answer that
is a call is ``TOOL_CALL_EXIT`` (README "Exit codes")."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from edgevlm.runtime.errors import UsageError

TOOL_CALL_EXIT = 15


def _json_arg(arg: str, flag: str):
    text = arg
    if not arg.lstrip().startswith(("[", "{")):
        p = Path(arg).expanduser()
        if not p.is_file():
            raise UsageError(f"{flag}: no such file and not JSON: {arg[:60]}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{flag}: cannot read {p}: {getattr(e, 'strerror', None) or e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.") from e


def earlier_calls(arg: Optional[str], results: list[str], tools) -> list[tuple[dict, str]]:
    """--tool-calls (what an earlier `vlm ask --tools` printed: its calls, or its --json document) and the
    --tool-result NAME=VALUE (or ID=VALUE; VALUE @FILE reads a file) for each -> [(call, result)], checked
    before the model loads."""
    if not results and arg is None:
        return []
    if arg is None:
        raise UsageError("--tool-result needs --tool-calls: the calls the results answer.",
                         hint="Pass what the first `vlm ask --tools` printed: --tool-calls \"$calls\".")
    doc = _json_arg(arg, "--tool-calls")
    calls = doc.get("tool_calls") if isinstance(doc, dict) else doc
    names = {t.name for t in tools}
    if not isinstance(calls, list) or not calls:
        raise UsageError("--tool-calls must be a non-empty list of calls (or a --json answer with tool_calls).")
    out_calls = []
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or fn["name"] not in names:
            raise UsageError(f"--tool-calls[{i}] is not a call of a function in --tools.",
                             hint='A call is {"id": ..., "type": "function", "function": {"name": ..., "arguments": "..."}}.')
        args = fn.get("arguments", "{}")
        out_calls.append({"id": str(c.get("id") or f"call_{i}"), "type": "function",
                          "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
    pending = list(out_calls)
    paired: list[tuple[dict, str]] = []
    for r in results:
        key, sep, value = r.partition("=")
        if not sep:
            raise UsageError(f"--tool-result {r[:40]!r} is not NAME=VALUE.", hint="For example --tool-result get_weather='{\"temp\": 18}'")
        if value.startswith("@"):
            try:
                value = Path(value[1:]).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--tool-result: cannot read {value[1:]}: {getattr(e, 'strerror', None) or e}") from e
        match = next((c for c in pending if c["id"] == key), None) or \
            next((c for c in pending if c["function"]["name"] == key), None)
        if match is None:
            raise UsageError(f"--tool-result {key!r} answers none of the calls in --tool-calls (by id or name).")
        pending.remove(match)
        paired.append((match, value))
    if pending:
        raise UsageError(f"The call {pending[0]['function']['name']} ({pending[0]['id']}) has no --tool-result.",
                         hint="Give one --tool-result NAME=VALUE per call.")
    return paired


def judged_text(answer) -> str:
    """What --guard judges as the answer: the text, then each call as name(arguments)."""
    return answer.judged_text()


def calls_json(answer) -> str:
    return json.dumps([c.openai() for c in answer.calls], ensure_ascii=False)
