"""Text pieces of a streamed answer: bytes split mid-character, and stop strings split across tokens."""
from __future__ import annotations

import codecs


class Utf8Stream:
    """Turns token pieces (bytes, possibly split mid-character) into text."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, b: bytes) -> str:
        return self._dec.decode(b)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class StopFilter:
    """Holds back text that might be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
