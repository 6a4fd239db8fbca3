"""Draftless drafting (``--draft``): tokens proposed from n-gram matches in the prompt and the answer so far
(prompt lookup, as llama.cpp's ngram speculative types), verified by the model in one batched evaluation.

An answer that quotes its input (extraction, "fill this form from this text", rewriting, a follow-up that
repeats the last answer) continues, token for token, something already in the context. When the last
2-4 tokens of the context occurred before, the tokens that followed them then are proposed; the decode
loop (``core.generate``) evaluates the sampled token and the drafts together (``Backend.eval_rows``: one
logits row per position), keeps the longest prefix the model accepts and drops the rest from the KV
cache (``Backend.drop_last``). Greedy output is the same as plain decoding's; sampled output follows the
same distribution (``Sampler.check``). No second model, no training.

Modes: ``off``; ``ngram``: draft whenever the context matches (as many tokens as the backend verifies
exactly, ``Backend.draft_rows() - 1``); ``auto`` (the default): the number of drafted tokens follows the
measured acceptance, and drafting stops for the rest of the answer once a draft is expected to cost more
than it saves. Unsupported backends (``draft_rows() == 0``): ``auto`` is off, ``ngram`` is refused.
"""
from __future__ import annotations

from typing import Optional

from ..errors import UsageError

DRAFT_MODES = ("auto", "off", "ngram")

# n-gram lengths looked up, longest first: a 4-token match predicts its continuation better than a 2-token one
NGRAMS = (4, 3, 2)

# What one more row costs in a verification, as a fraction of a one-token step (measured with
# benchmarks/drafting.py on the 2-core x86 box, 1 thread: SmolLM2-135M Q4_1 0.30-0.33, Gemma 3 270M
# Q4_K_M 0.24-0.30; taken a little high so that auto errs towards plain decoding).
ROW_COST = 0.35
PRIOR = 0.6           # acceptance assumed before the first check (one drafted token, then more as it rises)
DECAY = 0.85          # weight of the past in the running acceptance rate
PAUSE = 16            # auto: matches left undrafted after acceptance fell (doubling after a failed retry) ...
RETRY = 0.45          # ... then the rate it tries again with: two rejections in a row stop it again


def check_mode(value) -> str:
    """``value`` as a draft mode, or one UsageError line (CLI flags, config, server options)."""
    if isinstance(value, str) and value.strip().lower() in DRAFT_MODES:
        return value.strip().lower()
    raise UsageError(f"--draft must be one of {', '.join(DRAFT_MODES)}, not {str(value)[:40]!r}.",
                     hint="auto drafts from the prompt while it pays; off never drafts; ngram always does.")


class NgramIndex:
    """Where each 2-4-gram of the context last occurred (with a token after it), kept up to date as the
    answer grows. Image positions (non-int KV keys) match nothing."""

    def __init__(self, keys: list, generated: list[int]) -> None:
        self.toks: list[int] = [k if isinstance(k, int) else -1 - i for i, k in enumerate(keys)]
        self.generated, self.seen = generated, 0
        self.last: list[dict] = [{} for _ in NGRAMS]
        toks = self.toks
        for d, n in zip(self.last, NGRAMS):
            for j in range(n, len(toks)):
                d[tuple(toks[j - n: j])] = j

    def _sync(self) -> None:
        toks, gen = self.toks, self.generated
        while self.seen < len(gen):
            end = len(toks)
            for d, n in zip(self.last, NGRAMS):
                if end >= n:
                    d[tuple(toks[end - n: end])] = end
            toks.append(gen[self.seen])
            self.seen += 1

    def match(self, k: int) -> tuple[int, list[int]]:
        """(n, up to ``k`` tokens that followed the last earlier occurrence of the context's last n-gram), for
        the longest n that occurred before; (0, []) when none did."""
        self._sync()
        toks = self.toks
        for d, n in zip(self.last, NGRAMS):
            if len(toks) < n:
                continue
            pos = d.get(tuple(toks[-n:]))
            if pos is not None:
                out = toks[pos: pos + k]
                for i, t in enumerate(out):
                    if t < 0:
                        return n, out[:i]
                return n, out
        return 0, []


class Drafting:
    """One answer's drafting: the n-gram index, how many tokens to draft, and the counts for reports.

    auto keeps a running acceptance rate per n-gram length (a 4-token match is a better guess than a
    2-token one) and drafts, for a match of length n, the number of tokens that maximises the expected
    tokens per unit of work at that rate (``ROW_COST`` per extra row). When that is none, matches of that
    length are not drafted for a pause that doubles with each failed retry (an answer that never follows
    its context checks a handful of drafts in all), then tried again with one token."""

    def __init__(self, mode: str, max_draft: int) -> None:
        self.mode, self.max_draft = mode, max_draft
        self.index: Optional[NgramIndex] = None
        self._keys: list = []
        self._generated: list[int] = []
        self.rate = dict.fromkeys(NGRAMS, PRIOR)
        self.skip = dict.fromkeys(NGRAMS, 0)        # auto: matches of length n left undrafted before a retry
        self.pause = dict.fromkeys(NGRAMS, PAUSE)
        self.n = 0                                   # the match length of the draft being checked
        self.checked = self.accepted = 0

    @classmethod
    def start(cls, backend, mode: str) -> Optional["Drafting"]:
        """Drafting for an answer about to be generated on ``backend`` (before its prefill, so that a refusal
        costs nothing), or None; ``begin`` it after the prefill."""
        mode = check_mode(mode)
        if mode == "off":
            return None
        rows = backend.draft_rows()
        if rows < 2:
            if mode == "ngram":
                raise UsageError("--draft ngram: this model cannot verify drafted tokens here.",
                                 hint="Drafting needs a GGUF model without recurrent layers, outside "
                                      "`vlm serve --parallel`; use --draft auto or off.")
            return None
        return cls(mode, rows - 1)

    def begin(self, keys: list, generated: list[int]) -> None:
        """The context after the prefill (a copy of ``keys``: ``Backend.kv_keys``), and the answer's token
        list, which the loop grows (read, never written here)."""
        self._keys, self._generated = list(keys), generated

    def _length(self, n: int) -> int:
        if self.mode == "ngram":
            return self.max_draft
        if self.skip[n] > 0:
            self.skip[n] -= 1
            if self.skip[n] == 0:
                self.rate[n] = RETRY
            return 0
        a, best, best_k = self.rate[n], 1.0, 0
        for k in range(1, self.max_draft + 1):
            gain = (1 - a ** (k + 1)) / (1 - a) / (1 + ROW_COST * k) if a < 1 else (k + 1) / (1 + ROW_COST * k)
            if gain > best * 1.02:
                best, best_k = gain, k
        if best_k == 0:
            self.skip[n], self.pause[n] = self.pause[n], self.pause[n] * 2
        return best_k

    def propose(self, room: int, constraint=None) -> list[int]:
        """The tokens to verify with the next step (at most ``room``), or []."""
        if room <= 0:
            return []
        if self.index is None:
            self.index = NgramIndex(self._keys, self._generated)
            self._keys = []
        n, out = self.index.match(min(self.max_draft, room))
        if not out:
            return []
        out = out[: self._length(n)]
        if out and constraint is not None:
            out = out[: constraint.valid_prefix(out)]   # what the schema would refuse is not worth a row
        self.n = n
        return out

    def record(self, accepted: bool) -> None:
        self.checked += 1
        self.accepted += accepted
        n = self.n
        self.rate[n] = self.rate[n] * DECAY + (1 - DECAY) * accepted
        if accepted:
            self.pause[n] = PAUSE


__all__ = ["DRAFT_MODES", "Drafting", "NgramIndex", "check_mode"]
