"""Sorting the positional arguments of ask/chat into media and prompt text, and reading stdin."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from edgevlm.runtime.errors import BadMedia, UsageError

MAX_STDIN_TEXT = 8 * 1024 * 1024


def _is_media_ref(arg: str) -> bool:
    return arg == "-" or arg.startswith(("http://", "https://")) or os.path.isfile(os.path.expanduser(arg))


@dataclass
class Inputs:
    media: list[str] = field(default_factory=list)
    prompt: Optional[str] = None


def split_args(args: list[str]) -> Inputs:
    """`vlm ask a.jpg b.png "question"`: the last argument is the prompt unless it names a file/URL/-."""
    out = Inputs()
    if not args:
        return out
    *head, last = args
    if _is_media_ref(last):
        head, last = args, None
    for a in head:
        if not _is_media_ref(a):
            p = os.path.expanduser(a)
            if os.path.isdir(p):
                raise BadMedia(f"{a} is a directory.", hint="Pass image files; `vlm caption DIR` handles folders.")
            raise BadMedia(f"No such file: {a}", hint="Check the path; the question goes last, in quotes.")
        out.media.append(a)
    out.prompt = last
    return out


def read_stdin_text() -> Optional[str]:
    """Text piped on stdin becomes context (`cat notes.txt | vlm ask "Summarize this"`)."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read(MAX_STDIN_TEXT + 1)
    if len(data) > MAX_STDIN_TEXT:
        raise UsageError("More than 8 MB of text on stdin.", hint="Pass a shorter excerpt.")
    text = data.decode("utf-8", errors="replace").strip()
    return text or None


def combine(prompt: Optional[str], context: Optional[str]) -> str:
    if context and prompt:
        return f"{context}\n\n{prompt}"
    if context or prompt:
        return context or prompt  # type: ignore[return-value]
    raise UsageError("No question given.", hint='Usage: vlm ask [IMAGE...] "QUESTION"  (or pipe text on stdin)')
