"""Choosing the next token from a logits row: llama.cpp's sampler chain, in numpy, for every backend.

Repeat penalty over the last 64 tokens, then top-k, top-p and min-p (on the raw probabilities), then
temperature and a draw from a generator seeded by ``seed``. Temperature <= 0 is greedy: an argmax of
the row, nothing copied (what every benchmark and verification runs). A drafted token (--draft) is
checked against the same processed distribution (``__call__``'s ``draft``).
"""
from __future__ import annotations

from typing import Optional

from ..protocol import GenerationOptions


class Sampler:
    def __init__(self, options: GenerationOptions) -> None:
        import numpy as np

        self.np = np
        self.greedy = options.temperature <= 0
        self.temp = float(options.temperature)
        self.top_k = int(options.top_k)
        self.top_p = float(options.top_p)
        self.min_p = float(options.min_p)
        self.penalty = float(options.repeat_penalty or 1.0)
        self.recent: list[int] = []
        self.rng = np.random.default_rng(None if options.seed is None else options.seed & 0xFFFFFFFF)

    def __call__(self, logits, draft: Optional[int] = None) -> int:
        """The next token. With ``draft`` (a token proposed without the model, --draft), the standard
        speculative rule for a deterministic draft: greedy, the argmax (the draft only if it is the argmax);
        sampling, the draft with its probability p under the processed distribution below, otherwise a draw
        from that distribution without it -- so every token keeps exactly its probability."""
        np = self.np
        if self.penalty != 1.0 and self.recent:
            logits = logits.copy()
            idx = np.fromiter(set(self.recent[-64:]), dtype=np.int64)
            v = logits[idx]
            logits[idx] = np.where(v > 0, v / self.penalty, v * self.penalty)
        tok = int(np.argmax(logits)) if self.greedy else self._draw(logits, draft)
        if self.penalty != 1.0:
            self.recent.append(tok)
        return tok

    def note(self, token: int) -> None:
        """A token chosen without sampling (forced by the constraint): the repeat penalty still sees it."""
        if self.penalty != 1.0:
            self.recent.append(int(token))

    def _draw(self, logits, draft: Optional[int] = None) -> int:
        np = self.np
        n = logits.shape[0]
        finite = np.isfinite(logits)           # a constraint sets forbidden tokens to -inf
        k = self.top_k if self.top_k > 0 else n
        k = min(k, int(np.count_nonzero(finite)) or 1)
        if k < n:
            cand = np.argpartition(logits, n - k)[n - k:]
        else:
            cand = np.arange(n)
        vals = logits[cand].astype(np.float64)
        order = np.argsort(-vals, kind="stable")
        cand, vals = cand[order], vals[order]
        p = np.exp(vals - vals[0])
        p /= p.sum()
        keep = len(p)
        if 0 < self.top_p < 1:
            keep = min(keep, int(np.searchsorted(np.cumsum(p), self.top_p)) + 1)
        if self.min_p > 0:
            keep = min(keep, max(1, int(np.count_nonzero(p >= self.min_p * p[0]))))
        cand, vals = cand[:keep], vals[:keep]
        q = np.exp((vals - vals[0]) / self.temp)
        q /= q.sum()
        if draft is not None:
            hit = np.flatnonzero(cand == draft)
            p = float(q[hit[0]]) if hit.size else 0.0
            if self.rng.random() < p:
                return int(draft)
            if hit.size:
                q[hit[0]] = 0.0
                q /= q.sum()      # (p < 1 here: some other token has probability)
        return int(cand[self.rng.choice(keep, p=q)])


__all__ = ["Sampler"]
