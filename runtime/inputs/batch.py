"""Batch jobs: expand inputs, write JSONL records that are never torn, resume without redoing work."""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from ..digest import sha256_file
from ..errors import UsageError

_GLOB_CHARS = set("*?[")


def expand_inputs(args: Iterable[str]) -> list[str]:
    """Files as given; folders recursively (hidden files skipped); globs expanded (** allowed).
    A path that does not exist is kept, so it becomes an error record rather than vanishing."""
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for a in args:
        p = Path(a).expanduser()
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    add(str(f))
        elif p.exists() or not (_GLOB_CHARS & set(a)):
            add(str(p) if not a.startswith(("http://", "https://")) else a)
        else:
            matches = sorted(m for m in glob.glob(os.path.expanduser(a), recursive=True) if os.path.isfile(m))
            if not matches:
                raise UsageError(f"No files match {a}.", hint="Check the pattern; quote it so the shell leaves ** alone.")
            for m in matches:
                add(m)
    return out


def file_sha256(path: str) -> Optional[str]:
    try:
        return sha256_file(path)
    except OSError:
        return None


def record_key(sha256: Optional[str], prompt: str, model: str, schema: Optional[dict],
               guard: Optional[str] = None) -> str:
    """What makes a record done for --resume: the image bytes, prompt, model, schema and, when the safety
    filter is on, its settings (a record written without the guard was never judged: do it again)."""
    s = json.dumps(schema, sort_keys=True) if schema is not None else ""
    g = f"\0guard:{guard}" if guard else ""
    return hashlib.sha256(f"{sha256}\0{prompt}\0{model}\0{s}{g}".encode()).hexdigest()


class JsonlWriter:
    """Appends one JSON object per line, each with a single write() on an O_APPEND descriptor, so a
    crash, kill or Ctrl-C leaves whole lines only. On resume a torn last line (from a full disk or
    power loss) is cut off before appending."""

    def __init__(self, path: str, resume: bool):
        self.path = path
        self.to_stdout = path == "-"
        self.done: set[str] = set()
        if self.to_stdout:
            self.fd = 1
            return
        p = Path(path).expanduser()
        if p.is_dir():
            raise UsageError(f"--out {path} is a directory.", hint="Give a file name, e.g. captions.jsonl")
        if p.exists() and p.stat().st_size and not resume:
            raise UsageError(f"{path} already exists.", hint="Pass --resume to continue it, or choose another --out.")
        if resume and p.exists():
            self._load_and_repair(p)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise UsageError(f"Cannot write {path}: {e.strerror or e}", hint="Choose a writable --out.") from e

    def _load_and_repair(self, p: Path) -> None:
        data = p.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):                       # a torn last line: drop it
            with open(p, "r+b") as f:
                f.truncate(end)
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "error" not in rec and rec.get("key"):
                self.done.add(rec["key"])

    def write(self, record: dict) -> None:
        # A file name that is not valid UTF-8 reaches us with lone surrogates (Python's surrogateescape);
        # "backslashreplace" writes each as the JSON escape \udcXX, so the line stays valid JSON and
        # reads back as the same str, which os.fsencode turns into the original bytes.
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        n = os.write(self.fd, line)
        if n != len(line):                        # disk full mid-line: cut it back, say so
            if not self.to_stdout:
                os.ftruncate(self.fd, os.lseek(self.fd, 0, os.SEEK_END) - n)
            raise OSError(28, "No space left on device")

    def close(self) -> None:
        if not self.to_stdout and self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
