"""A request's turn on a model, and the bridge between the model's threads and the event loop: ``Entry``
(one model file: its backend, its threads, its queue, its slots), ``Lease`` (a request holds one while
it runs: it takes the free slot whose last conversation shares the longest prefix with the request,
runs the generation on the model's thread and hands the chunks back through a ``ChunkStream``), and
the warm-up of a freshly loaded slot.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from ..protocol import ChatRequest
from .streams import _END, ChunkStream, _Failure

if TYPE_CHECKING:
    from ..loader import ResolvedModel
    from ..protocol import Backend


@dataclass
class Entry:
    """One model file: its backend (once loaded), its thread, its queue."""

    key: str                                   # the model file's path: aliases of one file share the entry
    id: str                                    # the name /v1/models shows
    resolved: "ResolvedModel"
    estimate: int                              # bytes, from our memory estimate
    pinned: bool                               # named on the command line: no idle unload
    keep_alive_s: Optional[float]
    executor: ThreadPoolExecutor
    n_slots: int = 1                           # conversations at once (--parallel for GGUF, else 1)
    prompt_cache_bytes: int = 0                # RAM for saved conversations (counted in estimate)
    backend: Optional["Backend"] = None
    slots: list = field(default_factory=list)  # backend.slots(), once loaded
    free: list = field(default_factory=list)   # indexes of slots no request holds
    sem: Optional[asyncio.Semaphore] = None
    closer: Optional[threading.Thread] = None
    load_future: Optional[asyncio.Future] = None
    admitted: int = 0                          # requests holding a place: waiting or running
    running: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = 0.0
    load_s: float = 0.0

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    @property
    def loading(self) -> bool:
        return self.load_future is not None and not self.load_future.done()

    @property
    def idle(self) -> bool:
        return self.admitted == 0 and not self.loading


class Lease:
    """A request's turn on a model: ``stream(request)`` runs the generation on the model's thread and
    yields its chunks; the model is released when that generation ends (or never starts)."""

    def __init__(self, pool, entry: Entry):         # pool: the ModelPool (its streams, its _changed)
        self.pool = pool
        self.entry = entry
        self._released = False
        self._slot: Optional[int] = None

    @property
    def backend(self) -> "Backend":
        assert self.entry.backend is not None
        return self.entry.backend

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        e = self.entry
        e.running -= 1
        e.admitted -= 1
        e.last_used = time.monotonic()
        if self._slot is not None:
            e.free.append(self._slot)
        e.sem.release()
        self.pool._changed(e)

    def _take_slot(self, request: Optional[ChatRequest]) -> "Backend":
        """The free slot whose last conversation shares the longest prefix with ``request``'s prompt; on a
        tie the lowest (llama.cpp splits a step whose sequence ids are not consecutive into ubatches)."""
        e = self.entry
        best = min(e.free)
        if request is not None and len(e.free) > 1:        # only --parallel slots (gguf_slots) get here
            import os.path

            try:
                text = self.backend.render(request)
            except Exception:                  # noqa: BLE001 - the prefill reports a template error
                text = ""
            best = max(e.free, key=lambda i: (len(os.path.commonprefix([e.slots[i].last_text, text])), -i))
        e.free.remove(best)
        self._slot = best
        return e.slots[best]

    def run(self, fn: Callable, request: Optional[ChatRequest] = None):
        """Run ``fn(slot)`` on one of the model's threads with a free slot of it (the backend itself
        unless --parallel), releasing the lease when it returns."""
        loop = asyncio.get_running_loop()
        slot = self._take_slot(request)
        fut = loop.run_in_executor(self.entry.executor, fn, slot)
        fut.add_done_callback(lambda _f: self.release())
        return fut

    def stream(self, request: ChatRequest, whole: bool = False) -> "ChunkStream":
        """Start ``generate(backend, request)`` on the model's thread; its chunks come back through the
        returned stream. ``ChunkStream.cancel()`` (client gone, task cancelled) stops the generation
        after the current token. ``whole``: an answer that is not streamed comes back as two chunks,
        the first token's (errors and TTFT as before) and the rest in one: the event loop is not woken
        per token for nothing (on a busy 2-core machine that did not measurably change decode speed; it
        saves the loop ~0.1 ms of work per token)."""
        import dataclasses

        from ..generation.core import generate

        stream = ChunkStream(asyncio.get_running_loop())
        self.pool.streams.add(stream)

        def work(backend) -> None:
            gen = generate(backend, request)
            held: list[str] = []
            first = True
            try:
                for chunk in gen:
                    if stream.cancelled.is_set():
                        break
                    if whole and not first and chunk.finish_reason is None:
                        held.append(chunk.text)
                        continue
                    if held:
                        chunk = dataclasses.replace(chunk, text="".join(held) + chunk.text)
                    first = False
                    stream.put(chunk)
            except BaseException as e:       # noqa: BLE001 - handed to the request, which maps it
                stream.put(_Failure(e))
                return
            finally:
                gen.close()                  # GeneratorExit inside generate: finish "cancelled"
                backend.end_generation()     # the other slots stop waiting for this one's tokens
            stream.put(_END)

        self.run(work, request)
        return stream


def warm_up(slot: "Backend") -> None:
    """One token through a freshly loaded model before any request (llama-server warms up too): the
    first answer otherwise paid for the chat template's compile, lazy imports and llama.cpp's first
    graph on the thread that computes (SmolLM2-135M: ~0.15 s). Leaves no trace: the KV cache
    is cleared and the slot remembers no conversation. A model that cannot answer a chat message (no
    template, say) still loads: its requests report their own errors."""
    from ..generation.core import complete
    from ..protocol import GenerationOptions, Message

    try:
        complete(slot, ChatRequest([Message("user", "Hi")], GenerationOptions(max_tokens=1, temperature=0)))
    except Exception:                 # noqa: BLE001 - a warm-up only saves time
        pass
    finally:
        slot.end_generation()
        slot.reset()
        if hasattr(slot, "last_text"):
            slot.last_text = ""
