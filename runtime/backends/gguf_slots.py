"""Several conversations on one llama.cpp context (``vlm serve --parallel N``), as llama-server's slots.

The context is made with ``n_seq_max = N`` (``LoadOptions.n_seq``) and N x ``n_ctx`` cells of KV
cache, one stream of ``n_ctx`` cells per sequence (as llama-server's slots: a token attends to its own
sequence only); each sequence may hold ``n_ctx`` positions (``kv_used`` against ``n_ctx``, as for one
conversation). Each slot is a Backend
view bound to one sequence, driven by ``generate`` on a thread of its own (the server's). What makes N conversations faster than N in turn is
the decode step: a slot's ``eval(token)`` does not decode at once but waits until every slot that is
generating has handed in its next token, and the last one to arrive decodes them all in one
``llama_decode`` (one batch, one row of logits per sequence): the weights are read once for N tokens.

One condition variable guards the context: prefills (which may encode images for seconds) and the
shared decode step never overlap, and a slot's logits are copied out of llama.cpp's buffer before the
next decode overwrites them. A slot leaves the step (``end_generation``) when its answer ends, however
it ends; the others stop waiting for it at once.

Every computation on the context (prefills, image encodes, decode steps) runs on one compute thread
of the step's own, whichever slot asks for it: llama.cpp's CPU backend (built with OpenMP, as pip
builds it) keeps a team of worker threads per calling thread, and decodes called from N slot threads
kept N teams whose idle workers spun on the cores the working team needed (SmolLM2-135M, 4 slots, 2
threads, 4 clients: 61-75 tok/s decoding on the slot threads, 75-89 on one thread, same runs).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional

from ..errors import BackendError
from .gguf_context import decode_error
from .gguf_images import cells_used

if TYPE_CHECKING:
    from ..protocol import ChatRequest, Prefill

GGUFBackend = Any      # gguf.GGUFBackend: a helper module does not import its backend (test_architecture)


class _Step:
    """The shared decode step of all slots of one context."""

    def __init__(self, backend: GGUFBackend, n: int) -> None:
        lc = backend._llama_cpp
        self.backend = backend
        self.cond = threading.Condition()
        self.generating: set[int] = set()        # slots between their prefill and end_generation
        self.pending: dict[int, int] = {}        # slot -> the token it handed in for the next step
        self.results: dict[int, object] = {}     # slot -> its logits row after the step, or the error
        self.batch = lc.llama_batch_init(n, 0, 1)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="vlm-decode")
        self.steps = 0                           # decode steps and the tokens they carried (for benchmarks)
        self.step_tokens = 0

    def call(self, fn, *args):
        """``fn(*args)`` on the context's compute thread (see the module's docstring); its result or error."""
        return self._compute.submit(fn, *args).result()

    def run_if_complete(self) -> None:
        """With ``cond`` held: decode the pending tokens once every generating slot has handed one in."""
        if not self.pending or len(self.pending) < len(self.generating):
            return
        import numpy as np

        b, lc = self.backend, self.backend._llama_cpp
        order = sorted(self.pending)
        batch = self.batch
        batch.n_tokens = len(order)
        for i, seq in enumerate(order):
            slot = b._slots[seq]
            batch.token[i] = self.pending[seq]
            batch.pos[i] = len(slot.keys)
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = True
        rc = self.call(lc.llama_decode, b._ctx, batch)
        for i, seq in enumerate(order):
            if rc != 0:
                self.results[seq] = decode_error(rc, "the next token")
                continue
            b._slots[seq].keys.append(self.pending[seq])
            row = np.ctypeslib.as_array(lc.llama_get_logits_ith(b._ctx, i), shape=(b._n_vocab,))
            self.results[seq] = row.copy()
        self.steps += 1
        self.step_tokens += len(order)
        self.pending.clear()
        self.cond.notify_all()

    def close(self) -> None:
        self._compute.shutdown(wait=True)
        if self.batch is not None:
            self.backend._llama_cpp.llama_batch_free(self.batch)
            self.batch = None


class GGUFSlot:
    """One sequence of a shared context, as a Backend for ``generate``."""

    format = "gguf"

    def __init__(self, backend: GGUFBackend, seq: int, step: _Step) -> None:
        self._b = backend
        self.seq = seq
        self._step = step
        self.keys: list = []                 # what this sequence's KV positions hold (GGUFBackend._keys)
        self.extra: list = []                # GGUFBackend._extra of this sequence
        self.last_prompt = None              # GGUFBackend._last_prompt of this sequence
        self.last_text = ""                  # the last prompt and answer: the server picks the slot that shares most
        self._logits = None
        self.image_report: Optional[dict] = None

    # what does not depend on the sequence: the backend's own
    def __getattr__(self, name):
        if name in ("artifact", "chat_template", "n_threads", "load_s", "info", "has_vision", "tokenize",
                    "detokenize", "count_tokens", "render", "is_eog", "eog_ids", "text_stream",
                    "constraint_tokenizer", "describe"):
            return getattr(self._b, name)
        raise AttributeError(name)

    @property
    def n_ctx(self) -> int:
        return self._b.n_ctx

    def _swap_in(self) -> None:
        b = self._b
        b._seq, b._keys, b._extra, b._last_prompt = self.seq, self.keys, self.extra, self.last_prompt

    def _swap_out(self) -> None:
        b = self._b
        self.keys, self.extra, self.last_prompt = b._keys, b._extra, b._last_prompt
        b._seq, b._keys, b._extra, b._last_prompt = 0, [], [], None

    def prefill(self, request: "ChatRequest") -> "Prefill":
        import numpy as np

        step, b = self._step, self._b
        with step.cond:
            step.generating.discard(self.seq)
            step.run_if_complete()               # the others need not wait for this slot's prefill
            self._swap_in()
            try:
                pre = step.call(b.prefill, request)
                ptr = b._llama_cpp.llama_get_logits_ith(b._ctx, -1)
                self._logits = np.ctypeslib.as_array(ptr, shape=(b._n_vocab,)).copy()
                self.image_report = b.image_report
            finally:
                self._swap_out()
            step.generating.add(self.seq)
        self.last_text = b.render(request)
        return pre

    def logits(self):
        return self._logits

    def eval(self, token: int) -> None:
        step = self._step
        with step.cond:
            step.pending[self.seq] = token
            step.run_if_complete()
            while self.seq not in step.results:
                step.cond.wait()
            out = step.results.pop(self.seq)
        if isinstance(out, BaseException):
            raise out
        self._logits = out

    def eval_tokens(self, tokens: list[int]) -> None:
        """One shared step per token: a slot's step carries one token of each generating sequence."""
        for t in tokens:
            self.eval(t)

    def end_generation(self) -> None:
        step = self._step
        with step.cond:
            step.generating.discard(self.seq)
            step.pending.pop(self.seq, None)
            step.results.pop(self.seq, None)
            step.run_if_complete()

    def kv_used(self) -> int:
        return cells_used(self.keys, self.extra)

    def draft_rows(self) -> int:
        return 0       # a shared step carries one token per sequence: no drafting in slots (see docs/decode-less.md)

    def eval_rows(self, tokens):
        raise BackendError("A --parallel slot does not verify drafts.", hint="This is a bug: draft_rows() is 0.")

    def drop_last(self, n: int) -> None:
        raise BackendError("A --parallel slot does not verify drafts.", hint="This is a bug: draft_rows() is 0.")

    def kv_keys(self) -> list:
        return self.keys

    def reset(self) -> None:
        with self._step.cond:
            self._swap_in()
            try:
                self._b.reset()
            finally:
                self._swap_out()

    def slots(self) -> list:
        return self._b.slots()

    def kv_cache_bytes(self) -> Optional[int]:
        return self._b.kv_cache_bytes()

    def score(self, token_ids, *, batched: bool = True):
        raise BackendError("Scoring runs on a model loaded for one conversation.", hint="This is a bug.")

    def close(self) -> None:
        self._b.close()


def make_slots(backend: GGUFBackend, n: int) -> list[GGUFSlot]:
    step = _Step(backend, n)
    backend._slot_step = step
    return [GGUFSlot(backend, seq, step) for seq in range(n)]


__all__ = ["GGUFSlot", "make_slots"]
