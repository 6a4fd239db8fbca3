"""Loaded models: one backend per model file, a worker thread and a bounded queue each, kept within a
memory budget (least recently used unloads first) and unloaded after ``keep_alive`` idle. The pool
loads, unloads and admits; beside it: names.py (which model a request names), budget.py (admission
and the memory budget), lease.py (a request's turn on a model and the thread/event-loop bridge).

A backend is not thread-safe and keeps its KV cache between calls (a request that continues a
conversation evaluates only its new tokens), so each model has its own threads and nothing else
touches it: loading and generating run there, closing runs after them. The event loop only hands
requests to them and reads chunks back. Requests to one model run one at a time, or ``--parallel N``
at a time on a GGUF model (``Backend.slots``: N sequences of one context, each on a thread of its own,
their decode steps batched by the backend); at most ``queue_size`` more wait (beyond that: 503 with
Retry-After). A request goes to the free slot whose last conversation shares the longest prefix with
it, so a follow-up turn finds its KV cache (and its images) still there. A request whose client went
away stops its generation after the current token: its slot is free for the next one at once.
"""
from __future__ import annotations

import asyncio
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Optional

from ..protocol import LoadOptions
from .apierror import APIError
from .budget import MemoryBudget
from .lease import Entry, Lease, warm_up
from .names import ModelNames
from .settings import ServeSettings
from .streams import ChunkStream

if TYPE_CHECKING:
    from ..loader import ResolvedModel


class ModelPool:
    def __init__(self, settings: ServeSettings, metrics=None):
        self.settings = settings
        self.metrics = metrics
        self.entries: dict[str, Entry] = {}
        self.names = ModelNames(settings)
        self.memory = MemoryBudget(settings, self.names, self.entries)
        self._reaper: Optional[asyncio.Task] = None
        self.closing = False
        self.expired = False                    # the shutdown grace period is over: nothing more starts
        self.streams: "weakref.WeakSet[ChunkStream]" = weakref.WeakSet()

    # -- names and sizes (names.py, budget.py) -------------------------------------------------------
    def resolve(self, model_id: Optional[str]) -> "ResolvedModel":
        """The model a request names (names.ModelNames.resolve)."""
        return self.names.resolve(model_id)

    def model_id(self, resolved: "ResolvedModel") -> str:
        return self.names.model_id(resolved)

    def pinned_refs(self) -> list[str]:
        return self.names.pinned_refs()

    def prepare(self) -> list["ResolvedModel"]:
        """Resolve the command-line models before the server starts (a typo fails the command, not the
        first request) and check that they fit the memory budget together."""
        out = self.names.resolve_pinned()
        self.memory.check_pinned(out)
        return out

    def estimate(self, resolved: "ResolvedModel") -> int:
        return self.memory.estimate(resolved)

    def takes_images(self, resolved: "ResolvedModel") -> Optional[bool]:
        return self.memory.takes_images(resolved)

    # -- admission, loading, eviction ---------------------------------------------------------------
    async def acquire(self, model_id: Optional[str], keep_alive_s: Optional[float] = -1.0) -> Lease:
        """Wait for this model's turn (loading it first when needed). 503 at once when its queue is full.
        ``keep_alive_s``: -1 keeps the entry's setting; None never unloads; 0 unloads after this request."""
        if self.closing:
            raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        resolved = self.resolve(model_id)
        entry = self._entry_for(resolved)
        self.memory.admit(entry, self.metrics)
        if keep_alive_s is None or (keep_alive_s is not None and keep_alive_s >= 0):
            entry.keep_alive_s = keep_alive_s
        entry.admitted += 1
        self._changed(entry)
        locked = False
        try:
            if entry.sem is None:                      # set on the event loop once the load is done
                await asyncio.shield(self._ensure_loading(entry))
            await entry.sem.acquire()
            locked = True
            if self.expired:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            if entry.backend is None:                 # unloaded while we waited (cannot happen while admitted)
                raise APIError(503, f"{entry.id} was unloaded; retry.", type="server_error",
                               headers={"Retry-After": "1"})
        except BaseException:
            if locked:
                entry.sem.release()
            entry.admitted -= 1
            self._changed(entry)
            raise
        entry.running += 1
        self._changed(entry)
        return Lease(self, entry)

    def _entry_for(self, resolved: "ResolvedModel") -> Entry:
        key = str(resolved.artifact.path)
        entry = self.entries.get(key)
        if entry is not None:
            return entry
        est = self.memory.estimate(resolved)
        self.memory.make_room(est, resolved, self.unload)
        cache = self.memory.prompt_cache_bytes(resolved, est)
        pinned = self.names.is_pinned(resolved)
        n = self.memory.n_slots(resolved)
        entry = Entry(key=key, id=self.model_id(resolved), resolved=resolved, estimate=est + cache, pinned=pinned,
                      prompt_cache_bytes=cache,
                      keep_alive_s=None if pinned else self.settings.keep_alive_s, n_slots=n,
                      executor=ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"vlm-{resolved.name}"[:24]))
        self.entries[key] = entry
        return entry

    def expire(self) -> None:
        """The shutdown grace period is over: every answer still streaming ends now with an error (the
        client sees an error event, not a cut connection), and nothing waiting starts."""
        self.expired = True
        err = APIError(503, "The server is shutting down: the grace period for answers in progress ended.",
                       type="server_error", code="shutting_down")
        for stream in list(self.streams):
            stream.fail(err)

    def _ensure_loading(self, entry: Entry) -> asyncio.Future:
        if entry.load_future is None:
            loop = asyncio.get_running_loop()
            entry.load_future = loop.run_in_executor(entry.executor, self._load, entry)
            entry.load_future.add_done_callback(lambda f: self._loaded(entry, f))
            self._changed(entry)
        return entry.load_future

    def _load(self, entry: Entry) -> None:
        from ..loader import load_backend

        t0 = time.perf_counter()
        from ..reports.gpu import plan as gpu_plan

        opts = LoadOptions(n_ctx=self.settings.ctx, n_threads=self.settings.threads, n_seq=entry.n_slots,
                           prompt_cache_bytes=entry.prompt_cache_bytes, kv_type=self.memory.kv_type(entry.resolved))
        gpu = gpu_plan(entry.resolved, self.settings.ctx, self.settings.gpu_layers)   # 0 on a CPU-only build
        opts.n_gpu_layers = gpu.layers if gpu is not None else 0
        backend = load_backend(entry.resolved.artifact, opts)
        entry.slots = backend.slots()
        entry.backend = backend
        warm_up(entry.slots[0])
        entry.load_s = time.perf_counter() - t0

    def _loaded(self, entry: Entry, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            if self.entries.get(entry.key) is entry:       # a failed load leaves nothing behind: retry loads again
                del self.entries[entry.key]
            entry.executor.shutdown(wait=False)
        else:
            entry.free = list(range(len(entry.slots)))
            entry.sem = asyncio.Semaphore(len(entry.slots))
            entry.loaded_at = time.time()
            entry.last_used = time.monotonic()
        self._changed(entry)

    async def preload(self) -> None:
        """Load the command-line models, one after another (startup; /health says 503 until done)."""
        for ref in self.pinned_refs():
            lease = await self.acquire(ref)
            lease.release()

    def unload(self, entry: Entry) -> None:
        """Forget ``entry``; its backend is closed once everything still running on its threads is done."""
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.closer is not None:
            return

        def close() -> None:
            entry.executor.shutdown(wait=True)
            if entry.backend is not None:
                entry.backend.close()
                entry.backend = None
            entry.slots = []

        entry.closer = threading.Thread(target=close, name=f"vlm-close-{entry.id}"[:24], daemon=True)
        entry.closer.start()
        self._changed(entry)

    # -- keep-alive ---------------------------------------------------------------------------------
    def start_reaper(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for e in list(self.entries.values()):
                if e.keep_alive_s is not None and e.backend is not None and e.idle and now - e.last_used >= e.keep_alive_s:
                    self.unload(e)

    def _changed(self, entry: Entry) -> None:
        if self.metrics is not None:
            self.metrics.observe_entry(entry, entry.key in self.entries)

    @property
    def loading(self) -> bool:
        return any(e.loading for e in self.entries.values())

    def loaded(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.backend is not None]

    async def close(self) -> None:
        """Shutdown: no new requests; close every backend on its thread once its work is done."""
        self.closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        entries = list(self.entries.values())
        for e in entries:
            self.unload(e)

        def join() -> None:
            for e in entries:
                if e.closer is not None:
                    e.closer.join()

        await asyncio.get_running_loop().run_in_executor(None, join)


__all__ = ["ModelPool", "Lease", "Entry", "ChunkStream"]
