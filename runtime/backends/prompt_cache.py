"""Conversations kept in RAM when their KV cache is needed for another one (llama-server's ``--cache-ram``).

A backend's KV cache (a llama.cpp sequence, or the ONNX backend's past key/values) holds one
conversation. When a request shares little with what it holds (another conversation on a one-slot
server, a client alternating between chats), that KV would be overwritten and, when the first
conversation comes back, its whole prompt evaluated again: its images too, seconds on a CPU. Instead
the state is copied out first and copied back in when a later request continues it, as llama-server
does (GGUF: ``llama_state_seq_get_data_ext``, ~4 MiB and a few ms for 170 tokens of SmolLM2-135M; back
in under 1 ms. ONNX: a copy of the past arrays).

The state is saved when a request would drop a quarter of it or more, or when a saved state fits the
request better. (llama-server saves when less than half is kept: short conversations, whose shared
template head is half of them, were then lost; a next turn whose template re-renders the last answer a
little differently (Gemma trims it), or a regenerated answer, drops less and saves nothing.) A saved
state replaces the current one when it keeps at least a quarter of itself and matches more of the
request, as a share of both, than the current one does: that is llama-server's rule (server-context.cpp,
``server_prompt_cache::load``). A state moves back in (it is not kept twice); states contained in a newer
one are dropped; the oldest go first when the byte limit is reached. The limit is the server's (``vlm
serve --prompt-cache``); the memory check counts it.

What a backend provides (private, used only here): ``_keys`` (what each KV position holds),
``_state_size()``, ``_state_get(size)`` (an opaque copy, or None), ``_state_set(data, size)`` (True when
restored; the caller then sets ``_keys``), and ``reset()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Backend = Any          # a GGUF or ONNX backend: a helper module does not import one (test_architecture)


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _State:
    keys: list               # what the positions held (Backend._keys)
    data: Any                # the backend's copy (GGUF: llama.cpp's serialized sequence; ONNX: past arrays)
    size: int


class PromptCache:
    """Saved KV states of one backend (all slots of a llama.cpp context), at most ``limit`` bytes, oldest first."""

    def __init__(self, limit: int, n_swa: int = 0) -> None:
        self.limit = limit
        self.n_swa = n_swa                    # the model's sliding window (0: none)
        self.states: list[_State] = []
        self.saved = self.restored = 0        # counts, for benchmarks and tests

    @property
    def used(self) -> int:
        return sum(s.size for s in self.states)

    def prepare(self, b: Backend, keys: list) -> None:
        """Before ``b`` evaluates a prompt of ``keys`` on its current sequence: keep what the sequence
        holds if the prompt would overwrite much of it, and bring back a saved conversation that the
        prompt continues better."""
        cur = b._keys
        if not keys:
            return
        lcp = common_prefix(cur, keys)
        f_keep = lcp / len(cur) if cur else -1.0
        f_sim = lcp / len(keys)
        best = None
        for s in self.states:
            n = common_prefix(s.keys, keys)
            fk, fs = n / len(s.keys), n / len(keys)
            if fk >= 0.25 and fk > f_keep and fs > f_sim and self._usable(s, min(n, len(keys) - 1)):
                best, f_keep, f_sim = s, fk, fs
        if cur and (best is not None or 4 * lcp < 3 * len(cur)):
            self._save(b)
        if best is not None:
            self._load(b, best)

    def _usable(self, state: _State, n: int) -> bool:
        """Whether the first ``n`` positions of ``state`` can be continued: a sliding-window layer's cells
        before the last ``n_swa`` positions are not saved, so a longer state serves only its continuation."""
        return not self.n_swa or max(0, len(state.keys) - self.n_swa) <= max(0, n - self.n_swa)

    def _save(self, b: Backend) -> None:
        cur = b._keys
        if any(common_prefix(s.keys, cur) == len(cur) for s in self.states):
            return                                           # already here (a state that continues it)
        size = b._state_size()
        if size <= 0 or size > self.limit:
            return
        self.states = [s for s in self.states if common_prefix(s.keys, cur) < len(s.keys)]
        while self.states and self.used + size > self.limit:
            self.states.pop(0)
        try:
            data = b._state_get(size)
        except MemoryError:
            return
        if data is None:
            return
        self.states.append(_State(list(cur), data, size))
        self.saved += 1

    def _load(self, b: Backend, state: _State) -> None:
        self.states.remove(state)
        if not b._state_set(state.data, state.size):
            b.reset()                                        # what a failed restore left is unknown
            return
        b._keys = state.keys
        self.restored += 1

    def clear(self) -> None:
        self.states = []


__all__ = ["PromptCache", "common_prefix"]
